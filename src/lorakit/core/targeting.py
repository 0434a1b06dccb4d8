"""Which modules and parameters of a model an adapter config targets (PEFT's rules).

* a list of names matches a module whose full name equals an entry or ends with ``.`` + entry;
* a string is a regex that must match the full module name;
* ``"all-linear"`` is every Linear / Conv1D except the output layer (and a classifier head);
* ``layers_to_transform`` keeps only modules whose first numbered segment (after
  ``layers_pattern`` when given) is one of those indices;
* ``exclude_modules`` and ``modules_to_save`` always win.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

import torch.nn as nn

from lorakit.core.config import ALL_LINEAR, LoraConfig
from lorakit.core.layers import LoraLayer, LoraLinear, is_linear_like, wrap_module
from lorakit.core.layers.param import LoraParameter, innermost
from lorakit.core.modules_to_save import TrainableCopies
from lorakit.core.trainable_tokens import TrainableTokens
from lorakit.errors import TargetModuleError

SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def visible_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without the insides of LoRA wrappers and trainable copies.

    Its cost doesn't grow with the number of adapters loaded (adapter modules are never visited),
    which keeps loading the 50th adapter as fast as the first.
    """
    yield prefix, model
    if isinstance(model, (LoraLayer, TrainableCopies, TrainableTokens)):
        return
    for name, child in model._modules.items():
        if child is not None:
            yield from visible_modules(child, f"{prefix}.{name}" if prefix else name)


Wrapper = LoraLayer | TrainableCopies | TrainableTokens


def named_wrappers(model: nn.Module) -> Iterator[tuple[str, Wrapper]]:
    """(path, wrapper) for every LoRA layer, trainable-copies and trainable-tokens wrapper, nested ones included."""
    for path, module in visible_modules(model):
        while isinstance(module, LoraLayer):
            yield path, module
            path, module = f"{path}.base", module.base
        if isinstance(module, (TrainableCopies, TrainableTokens)):
            yield path, module


def iter_wrappers(model: nn.Module) -> Iterator[Wrapper]:
    return (module for _, module in named_wrappers(model))


def _is_linear_target(module: nn.Module) -> bool:
    if isinstance(module, LoraLayer):
        return isinstance(module, LoraLinear)
    return is_linear_like(module)


def output_layer_names(model: nn.Module, config: LoraConfig) -> set[str]:
    """The output head(s) "all-linear" leaves alone, as PEFT does."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    modules = dict(visible_modules(model))
    if out is not None:
        names |= {n for n, m in modules.items() if m is out or getattr(m, "base", None) is out}
    elif hasattr(model, "config") or config.task_type == "SEQ_CLS":
        names |= {n for n in SEQ_CLS_HEAD_NAMES if n in modules}
    return names


def _layer_index_ok(name: str, config: LoraConfig) -> bool:
    indexes = config.layers_to_transform
    if indexes is None or indexes == []:
        return True
    patterns = config.layers_pattern
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def _name_matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + t) for t in spec)


def _excluded(name: str, config: LoraConfig) -> bool:
    if config.exclude_modules and _name_matches(name, config.exclude_modules):
        return True
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in config.modules_to_save or [])


def find_target_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules this config puts LoRA on; raises when it matches nothing."""
    if config.target_modules is None:
        return []
    if not config.target_modules and config.target_parameters:
        return []  # PEFT writes target_modules: [] for an adapter on raw parameters only
    modules = dict(visible_modules(model))
    if config.target_modules == ALL_LINEAR:
        skip = output_layer_names(model, config)
        found = [n for n, m in modules.items() if n and _is_linear_target(m) and n not in skip]
    else:
        found = [n for n in modules if n and _name_matches(n, config.target_modules)]
    found = [n for n in found if not _excluded(n, config) and _layer_index_ok(n, config)]
    if not found:
        raise TargetModuleError(_no_match_message(config.target_modules, modules))
    inner = [n for n in found if isinstance(modules.get(n.rpartition(".")[0]), nn.MultiheadAttention)]
    if inner:  # PEFT wraps it and the adapter silently does nothing; torch would fail on our wrapper
        mha = inner[0].rpartition(".")[0]
        raise TargetModuleError(
            f"target_modules {config.target_modules!r} matches {inner[0]!r}, a sub-layer of the "
            f"nn.MultiheadAttention {mha!r}: torch reads its weight directly and never calls it, so LoRA there "
            f"would have no effect. Target the attention module itself ({mha.rpartition('.')[2]!r}: LoRA on "
            "in_proj and out_proj), or leave it out (e.g. exclude_modules=['out_proj'] with 'all-linear')"
        )
    for name in found:
        module = modules[name]
        if isinstance(module, LoraParameter) or (
            not isinstance(module, LoraLayer) and wrap_module(module) is None
        ):
            raise TargetModuleError(
                f"target module {name!r} is a {type(module).__name__}; LoRA wraps Linear, Conv1D (GPT-2), "
                "Embedding, Conv1d/2d/3d and MultiheadAttention layers. Target its linear sub-layers instead, or use "
                "target_parameters for a raw weight"
            )
    return found


def find_target_parameters(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """(module name, parameter name) pairs named by config.target_parameters."""
    if not config.target_parameters:
        return []
    found: list[tuple[str, str]] = []
    available: list[str] = []
    for mod_name, module in visible_modules(model):
        if isinstance(module, LoraLayer) and not isinstance(module, LoraParameter):
            base = module.base
            while isinstance(base, LoraLayer):
                base = base.base
            hit = [n for n, _ in base.named_parameters(recurse=False)
                   if _name_matches(f"{mod_name}.{n}", config.target_parameters)]
            if hit:  # silently skipping it would load an adapter without that parameter's update
                raise TargetModuleError(f"target_parameters names {mod_name}.{hit[0]}, but {mod_name!r} already "
                                        "carries LoRA through target_modules; target the module or its parameter")
            continue
        for param_name, _ in innermost(module).named_parameters(recurse=False):
            full = f"{mod_name}.{param_name}" if mod_name else param_name
            available.append(full)
            if _name_matches(full, config.target_parameters) and not _excluded(mod_name, config):
                found.append((mod_name, param_name))
    if not found:
        raise TargetModuleError(_no_match_message(config.target_parameters, available, what="target_parameters"))
    return found


def _no_match_message(spec, names, what: str = "target_modules") -> str:
    names = [n for n in names if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [spec] if isinstance(spec, str) else list(spec)
    close: list[str] = []
    for w in wanted:
        close += difflib.get_close_matches(w.rsplit(".", 1)[-1], leaves, n=5, cutoff=0.5)
        close += difflib.get_close_matches(w, names, n=3, cutoff=0.6)
    close = list(dict.fromkeys(close))
    hint = f" Closest names: {', '.join(close)}." if close else ""
    return (
        f"{what} {spec!r} matched no module of the model.{hint} "
        f"Module names in this model (last part): {', '.join(leaves[:60])}"
        + (" ..." if len(leaves) > 60 else "")
    )
