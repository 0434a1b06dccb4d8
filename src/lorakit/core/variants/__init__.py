"""LoRA variants. Each is a LoraAdapter subclass (or an init) in its own file.

==================  =====================================  =========================================
variant             how to ask for it                      file
==================  =====================================  =========================================
DoRA                ``LoraConfig(use_dora=True)``          dora.py
rsLoRA              ``LoraConfig(use_rslora=True)``        (scaling α/√r in adapter_weights.py)
PiSSA               ``init_lora_weights="pissa"`` or       pissa.py
                    ``"pissa_niter_K"``
LoRA+               ``loraplus.param_groups(model, ...)``  loraplus.py
AdaLoRA             ``AdaLoraConfig(init_r=, target_r=,    adalora.py, adalora_budget.py
                    total_step=, ...)``
DyLoRA              ``LoraConfig(use_dylora=True)``        dylora.py
shared A            ``LoraConfig(shared_a_with="task")``   shared_a.py
==================  =====================================  =========================================

The model calls :func:`adapter_class` (which class), :func:`setup_adapter` (variant tensors and
inits, once per layer) and :func:`prepare_load` (before loading a folder). A training loop calls
:func:`training_hooks` once and then, per step::

    loss = out.loss + sum(h.extra_loss(model) for h in hooks)   # AdaLoRA's orthogonality penalty
    loss.backward(); optimizer.step()
    for h in hooks: h.step(model, global_step)                   # AdaLoRA budget, DyLoRA rank draw
    optimizer.zero_grad()
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch

from lorakit.core.config import LoraConfig
from lorakit.core.layers import LoraAdapter, LoraConv, LoraLayer
from lorakit.core.variants.adalora import (
    AdaLoraAdapter,
    AdaLoraConfig,
    orthogonal_loss,
    trainable_adalora_name,
)
from lorakit.core.variants.adalora_conv import AdaLoraConvAdapter
from lorakit.core.variants.dora import DoraAdapter
from lorakit.core.variants.dylora import DyLoraAdapter, DyLoraController, dylora_adapters, set_rank
from lorakit.core.variants.lora_bias import LoraBiasAdapter
from lorakit.core.variants.olora import olora_init, orthogonal_init
from lorakit.core.variants.pissa import pissa_init, restore_base
from lorakit.core.variants.shared_a import SharedAAdapter
from lorakit.errors import ConfigError

__all__ = [
    "AdaLoraAdapter",
    "AdaLoraConfig",
    "AdaLoraConvAdapter",
    "DoraAdapter",
    "DyLoraAdapter",
    "LoraBiasAdapter",
    "SharedAAdapter",
    "adapter_class",
    "config_class_for_peft_type",
    "orthogonal_loss",
    "prepare_load",
    "set_rank",
    "setup_adapter",
    "teardown_adapter",
    "training_hooks",
]


def adapter_class(config: LoraConfig, layer: LoraLayer) -> type[LoraAdapter]:
    """The adapter class a config asks for on this layer."""
    if isinstance(config, AdaLoraConfig):
        return AdaLoraConvAdapter if isinstance(layer, LoraConv) else AdaLoraAdapter
    if config.use_dora:
        return DoraAdapter
    if config.use_dylora:
        return DyLoraAdapter
    if config.lora_bias:
        return LoraBiasAdapter
    if config.shared_a_with:
        if isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith("pissa"):
            raise ConfigError("shared_a_with can't be combined with a PiSSA init (A comes from the owner)")
        return SharedAAdapter
    return LoraAdapter


def setup_adapter(layer: LoraLayer, adapter: LoraAdapter, config: LoraConfig) -> None:
    """Run the init that needs the base weight (PiSSA), then the variant's own setup."""
    init = config.init_lora_weights
    is_pissa = isinstance(init, str) and init.startswith("pissa")
    others = [a for a in layer.adapters.values() if a is not adapter]
    # a dict lookup, not hasattr: nn.Module's __getattr__ raises for every miss, which made the k-th load
    # on a layer cost O(k) exceptions
    if others and (is_pissa or init == "olora" or any("pissa_a0" in a._buffers for a in others)):
        warnings.warn("a PiSSA/OLoRA adapter shares a layer with other adapters: it rewrote the base weight to "
                      "W0 − s·B0·A0, so the others see that residual. Keep PiSSA/OLoRA adapters alone, or convert "
                      "them with lorakit.core.variants.pissa.to_lora_factors", stacklevel=4)
    if is_pissa:
        pissa_init(layer, adapter, init)
    elif init == "olora":
        olora_init(layer, adapter)
    elif init == "orthogonal":
        orthogonal_init(layer, adapter)
    adapter.setup(layer, config)


def teardown_adapter(layer: LoraLayer, adapter: LoraAdapter) -> None:
    """Undo what setup_adapter did to the layer itself (PiSSA's residual in the base weight)."""
    restore_base(layer, adapter)


def prepare_load(model: torch.nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> LoraConfig:
    """The config to load a folder with (a shared A is kept only if the file agrees with the owner's)."""
    if config.shared_a_with:
        from lorakit.core.variants.shared_a import prepare_load as shared_prepare

        return shared_prepare(model, config, tensors)
    return config


_CONFIGS: dict[str, type[LoraConfig]] = {"LORA": LoraConfig, "ADALORA": AdaLoraConfig}


def config_class_for_peft_type(peft_type: str) -> type[LoraConfig]:
    """The config class that reads an adapter_config.json with this peft_type."""
    key = str(peft_type).upper()
    if key not in _CONFIGS:
        raise ConfigError(f"peft_type {peft_type!r} is not supported; lorakit reads {sorted(_CONFIGS)} adapters")
    return _CONFIGS[key]


class TrainingHook(Protocol):
    def extra_loss(self, model: torch.nn.Module) -> torch.Tensor: ...

    def step(self, model: torch.nn.Module, global_step: int) -> None: ...


def training_hooks(model: torch.nn.Module, seed: int = 0) -> list[TrainingHook]:
    """The per-step hooks the model's trainable variant adapters need (empty for plain LoRA)."""
    from lorakit.core.variants.adalora_budget import AdaLoraController

    hooks: list[TrainingHook] = []
    if trainable_adalora_name(model) is not None:
        hooks.append(AdaLoraController(model))
    configs = getattr(model, "peft_config", {})
    for name in getattr(model, "active_adapters", []):
        config = configs.get(name)
        if config is not None and config.use_dylora and not config.inference_mode and dylora_adapters(model, name):
            hooks.append(DyLoraController(model, name, seed=seed))
    return hooks
