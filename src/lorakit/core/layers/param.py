"""LoRA on a raw weight parameter of any module (RNN/LSTM/GRU gates, MoE expert tensors, ...).

W_eff = W + scaling · B·A for the named 2-D parameter; the wrapped module then runs with W_eff
through ``torch.func.functional_call``, so its own forward (cuDNN/flat-weight RNNs included) is
unchanged. Several parameters of one module are handled by nesting wrappers: each passes its
effective weight down to the next.

The delta is formed densely each forward (d×k): fine for RNN gates, which are reused at every
time step anyway. A per-row adapter choice in one batch is not possible here (the weight is
shared by the whole batch), and saying so beats silently looping.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.func import functional_call

from lorakit.core.layers.base import LoraAdapter, LoraLayer
from lorakit.errors import TargetModuleError


class LoraParameter(LoraLayer):
    kind = "param"

    def __init__(self, base: nn.Module, param_name: str):
        target = innermost(base)
        weight = getattr(target, param_name, None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            shape = None if weight is None else tuple(weight.shape)
            raise TargetModuleError(
                f"target parameter {param_name!r} must be a 2-D weight of {type(target).__name__}, got shape {shape}"
            )
        super().__init__(base)
        self.param_name = param_name

    @property
    def target(self) -> nn.Module:
        return innermost(self.base)

    @property
    def in_features(self) -> int:
        return getattr(self.target, self.param_name).shape[1]

    @property
    def out_features(self) -> int:
        return getattr(self.target, self.param_name).shape[0]

    def adapter_placement(self) -> dict:
        weight = getattr(self.target, self.param_name)
        return {"device": weight.device, "dtype": torch.float64 if weight.dtype == torch.float64 else torch.float32}

    def base_weight(self) -> torch.Tensor:
        return getattr(self.target, self.param_name)

    def add_adapter(self, name, rank, alpha, dropout=0.0, init=True, adapter_cls=LoraAdapter, rule="lora",
                    scale_rank=None):
        if dropout:
            warnings.warn(
                f"lora_dropout={dropout} is ignored for the raw parameter {self.param_name!r}: dropout acts on "
                "inputs, and this LoRA acts on a weight",
                stacklevel=3,
            )
        return super().add_adapter(name, rank, alpha, 0.0, init, adapter_cls, rule, scale_rank)

    def delta_from(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return b @ a  # (out, in)

    def forward(self, *args, _weight_overrides: dict | None = None, **kwargs):
        overrides = dict(_weight_overrides or {})
        if not self.disabled:
            if self.routing is not None:
                raise NotImplementedError(
                    f"a per-row adapter choice can't apply to the raw parameter {self.param_name!r}: "
                    "its weight is shared by every row. Run one adapter per batch for this model."
                )
            weight = self.base_weight()
            active = [n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]
            if active:
                deltas = [self.delta_weight_grad(n) for n in active]
                overrides[self.param_name] = weight + sum(deltas).to(weight.dtype)
        elif self.merged_adapters:
            self.unmerge()
        if isinstance(self.base, LoraParameter):
            return self.base(*args, _weight_overrides=overrides, **kwargs)
        if not overrides:
            return self.base(*args, **kwargs)
        return functional_call(self.base, overrides, args, kwargs, strict=False)

    def delta_weight_grad(self, name: str) -> torch.Tensor:
        """ΔW with autograd (delta_weight is for merging and is computed in fp32)."""
        adapter = self.adapters[name]
        return (adapter.lora_b @ adapter.lora_a) * adapter.scaling


def innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, LoraParameter):
        module = module.base
    return module

