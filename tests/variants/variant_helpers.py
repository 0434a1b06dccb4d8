"""Helpers shared by the variant tests (not a conftest.py: that name would shadow tests/conftest.py)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


class Fake4bitLinear(nn.Module):
    """Stands in for a 4-bit linear (the protocol LoraLinear relies on): the weight lives as 4-bit codes
    with one absmax scale per row, ``dequantize()`` reads it back and ``add_to_weight_`` re-quantises."""

    lorakit_linear = True

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.register_buffer("codes", torch.zeros(linear.weight.shape, dtype=torch.int8))
        self.register_buffer("scale", torch.zeros(linear.out_features, 1))
        self._quantize(linear.weight.detach().float())
        self.train(linear.training)

    def _quantize(self, weight: torch.Tensor) -> None:
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7  # (out, 1)
        self.codes.copy_(torch.round(weight / scale).clamp(-7, 7).to(torch.int8))
        self.scale.copy_(scale)

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale  # (out, in)

    def add_to_weight_(self, delta: torch.Tensor) -> None:
        self.last_target = self.dequantize() + delta.float()  # what the merge asked for, before rounding
        self._quantize(self.last_target)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)


def quantize_linears(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    """Replace every nn.Linear whose name ends in one of `names` by a Fake4bitLinear."""
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path.split(".")[-1] in names:
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child, Fake4bitLinear(module))
    return model
