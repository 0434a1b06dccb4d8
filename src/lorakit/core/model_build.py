"""How LoraModel builds its targets: which ones an adapter gets, their sizes, and the one
construction path of an adapter on a wrapped module or a raw parameter.

Module-level functions over the wrapped model (no LoraModel state), so that the save/load half
(:mod:`lorakit.core.model_io`) uses them too without importing :mod:`lorakit.core.model`, which
mixes it in (the package has no import cycles, lazy or not).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from lorakit.core.config import LoraConfig
from lorakit.core.layers import LoraAdapter, LoraLayer
from lorakit.core.layers.param import LoraParameter
from lorakit.core.modules_to_save import TrainableCopies
from lorakit.core.targeting import SEQ_CLS_HEAD_NAMES, visible_modules
from lorakit.core.trainable_tokens import TrainableTokens
from lorakit.core.variants import adapter_class, setup_adapter
from lorakit.errors import ConfigError


def check_same_target_parameters(config: LoraConfig, others: dict[str, LoraConfig]) -> None:
    """PEFT's rule: every adapter with target_parameters targets the same set (the nesting of the
    parameter wrappers, and so the saved key names, depends on that set)."""
    if not config.target_parameters:
        return
    wanted = set(config.target_parameters)
    for name, other in others.items():
        if other.target_parameters and set(other.target_parameters) != wanted:
            raise ConfigError(f"adapter {name!r} targets the parameters {sorted(other.target_parameters)}, this one "
                              f"{sorted(wanted)}; adapters with target_parameters must all target the same set "
                              "(PEFT's rule, which keeps their saved key names valid)")


def target_shapes(model: nn.Module, modules: list[str], params: list[tuple[str, str]],
                  config: LoraConfig) -> Iterator[tuple[str, int, int, int]]:
    """(path, rank, fan_in, fan_out) of every target, for the size bound."""
    for path in modules:
        module = model.get_submodule(path)
        while isinstance(module, LoraLayer) and not isinstance(module, LoraParameter):
            module = module.base
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            fan_in, fan_out = int(module.in_features), int(module.out_features)
        else:
            weight = getattr(module, "weight", None)
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else (0, 0)
            fan_in, fan_out = int(torch.Size(shape[1:]).numel()), int(shape[0])
        yield path, config.rank_for(path), fan_in, fan_out
    for path, param_name in params:
        key = f"{path}.{param_name}" if path else param_name
        weight = model.get_parameter(key) if key in dict(model.named_parameters()) else None
        shape = tuple(weight.shape) if weight is not None and weight.dim() >= 2 else (0, 0)
        yield key, config.rank_for(key), int(torch.Size(shape[1:]).numel()), int(shape[0])


def modules_to_save_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    """The module paths that `config.modules_to_save` names (a missing one is a ConfigError)."""
    wanted = config.modules_to_save or []
    paths = []
    for path, _ in visible_modules(model):
        if any(path == w or path.endswith("." + w) for w in wanted):
            paths.append(path)
    missing = [w for w in wanted if not any(p == w or p.endswith("." + w) for p in paths)]
    # PEFT lists both usual head names for SEQ_CLS adapters; a model has only one of them
    missing = [w for w in missing if not (config.task_type == "SEQ_CLS" and w in SEQ_CLS_HEAD_NAMES)]
    if missing:
        raise ConfigError(f"modules_to_save {missing} matched no module of the model")
    return paths


def add_to_layer(layer: LoraLayer, path: str, name: str, config: LoraConfig) -> LoraAdapter:
    """The one construction path of an adapter on a wrapped module or raw parameter.

    The config picks the class (a variant) and its scaling rule; ``setup_adapter`` then creates the
    variant's tensors and runs inits that need the base weight. A variant that can't act on this
    layer kind (e.g. DoRA on a raw parameter) raises there, never degrades to plain LoRA.
    """
    adapter = layer.add_adapter(name, config.rank_for(path), config.alpha_for(path), config.lora_dropout,
                                config.init_lora_weights, adapter_class(config, layer), config.scaling_rule(),
                                config.scale_rank_for(path))
    setup_adapter(layer, adapter, config)  # variant tensors (DoRA magnitude, ...) and inits (PiSSA)
    return adapter


def find_param_layer(module: nn.Module, param_name: str) -> LoraParameter | None:
    """The LoraParameter wrapping `param_name` in the stack of parameter wrappers at `module`, if any."""
    while isinstance(module, LoraParameter):
        if module.param_name == param_name:
            return module
        module = module.base
    return None


def with_seq_cls_head(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """PEFT's rule: a SEQ_CLS adapter trains and saves the classifier head in full."""
    if config.task_type != "SEQ_CLS":
        return config
    names = dict(model.named_children())
    heads = [n for n in SEQ_CLS_HEAD_NAMES if n in names]
    wanted = list(config.modules_to_save or [])
    extra = [h for h in heads if h not in wanted]
    return config.replace(modules_to_save=wanted + extra) if extra else config


def base_tensors(model: nn.Module, buffers: bool = True) -> Iterator[torch.Tensor]:
    """The model's parameters (and buffers) that belong to no adapter: base weights, also inside LoRA
    wrappers, and trainable copies / tokens. Adapter internals are never walked, so the cost doesn't
    grow with the number of adapters loaded."""
    for _, module in visible_modules(model):
        if isinstance(module, LoraLayer):
            owner, recurse = module.base, True
        elif isinstance(module, (TrainableCopies, TrainableTokens)):
            owner, recurse = module, True
        else:
            owner, recurse = module, False
        yield from owner.parameters(recurse=recurse)
        if buffers:
            yield from owner.buffers(recurse=recurse)
