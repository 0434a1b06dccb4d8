"""``lora_bias=True`` (PEFT): B carries a trainable bias, scaled like the rest of the path.

    h = base(x) + scaling · (B·A·dropout(x) + b)

computed as PEFT does, ``F.linear(u, B, b) * scaling`` (one fused addmm), so outputs are
bit-identical. Merging adds ``scaling·b`` to the base layer's bias (the base must have one,
as in PEFT); it is saved in the role ``lora_b_bias`` (PEFT's B bias). Linear and Conv layers only: PEFT refuses
it for Embedding layers and raw parameters, and so does lorakit.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.core.layers import LoraAdapter, LoraConv, LoraLayer, LoraLinear
from lorakit.errors import TargetModuleError


class LoraBiasAdapter(LoraAdapter):
    """Plain LoRA whose B has a bias (zero at init, like B)."""

    custom_math = True  # off the fused and concatenated fast paths: the bias sits inside the scaled term

    def setup(self, layer: LoraLayer, config) -> None:
        if not isinstance(layer, (LoraLinear, LoraConv)):
            raise TargetModuleError(f"lora_bias=True works on Linear and Conv layers only, not on "
                                    f"{type(layer.base).__name__} (PEFT refuses it too); exclude that layer")
        self.lora_b_bias = nn.Parameter(torch.zeros(layer.out_features, dtype=self.lora_b.dtype,
                                                    device=self.lora_b.device))
        if config.init_lora_weights is False:  # PEFT keeps nn.Linear's own bias init then: U(±1/√r)
            bound = 1 / math.sqrt(self.rank)
            with torch.no_grad():
                self.lora_b_bias.uniform_(-bound, bound)

    def tensor_roles(self) -> dict[str, str]:
        return {**super().tensor_roles(), "lora_b_bias": "lora_b_bias"}

    def extra_repr(self) -> str:
        return super().extra_repr() + ", lora_bias=True"

    def _project_b(self, layer: LoraLayer, u: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, LoraConv):  # PEFT's B: a 1×1 conv with the base's groups
            return layer._functional(u, self.lora_b, self.lora_b_bias, 1, 0, 1, getattr(layer.base, "groups", 1))
        return F.linear(u, self.lora_b, self.lora_b_bias)

    def output(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        x = layer.cast_input(x, self.lora_a.dtype)
        u = layer.project_a(self.dropout(x), self.lora_a)
        return result + (self._project_b(layer, u) * self.scaling).to(result.dtype)

    def _base_bias(self, layer: LoraLayer) -> torch.Tensor:
        bias = getattr(layer.base, "bias", None)
        if not isinstance(bias, torch.Tensor):
            raise ValueError("lora_bias=True can't be merged: the base layer has no bias to add it to "
                             "(PEFT refuses this merge too); keep the adapter unmerged")
        return bias

    def merge_into(self, layer: LoraLayer, safe: bool = True) -> None:
        bias = self._base_bias(layer)
        new_bias = bias + self.lora_b_bias * self.scaling
        if safe and not torch.isfinite(new_bias).all():
            raise ValueError("the adapter has NaN/inf weights; refusing to merge it into the base")
        super().merge_into(layer, safe)
        bias.data = new_bias.to(bias.dtype)

    def unmerge_from(self, layer: LoraLayer) -> None:
        super().unmerge_from(layer)
        bias = self._base_bias(layer)
        bias.data -= (self.lora_b_bias * self.scaling).to(bias.dtype)
