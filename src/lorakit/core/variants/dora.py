"""DoRA: weight-decomposed LoRA (Liu et al. 2024), with PEFT's exact formulas and file format.

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖        norm per output unit, treated as a constant

so the layer output is ``h = base(x) + (f - 1)·W0·x + f·s·B·A·x`` with ``f = m / ‖W0 + s·BA‖``
(PEFT's form, which reuses the base output instead of a second matmul with W0). The norm is
detached from the autograd graph (DoRA §4.3), the magnitude ``m`` starts at the row norms of
``W0 + s·BA`` (= ‖W0‖ with B = 0) and is saved in the role ``magnitude`` (PEFT's magnitude vector).

"Output unit" means a row of a Linear weight (a column of GPT-2's Conv1D), an output channel
of a Conv, and an embedding dimension of an Embedding (PEFT normalises the embedding matrix over
its vocabulary axis). A 4-bit base is used through ``layer.base_weight()`` (dequantised).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.core.layers import LoraAdapter, LoraConv, LoraEmbedding, LoraLayer, LoraLinear, LoraParameter
from lorakit.errors import TargetModuleError


def _out_axis(layer: LoraLayer) -> int:
    """The axis of the base weight that indexes output units."""
    return 1 if isinstance(layer, LoraEmbedding) or getattr(layer, "fan_in_fan_out", False) else 0


def unit_norm(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    """‖weight‖₂ per output unit, keepdim (broadcasts against the weight): (out, 1), (1, out), ..."""
    if isinstance(layer, LoraLinear):  # PEFT's reduction: over dim 1 of the (out, in) matrix
        fan_in_fan_out = layer.fan_in_fan_out
        norm = torch.linalg.norm(weight.T if fan_in_fan_out else weight, dim=1).to(weight.dtype)
        return norm.view(1, -1) if fan_in_fan_out else norm.view(-1, 1)
    axis = _out_axis(layer)
    return weight.norm(p=2, dim=tuple(d for d in range(weight.dim()) if d != axis), keepdim=True)


def unmerged_base_weight(layer: LoraLayer) -> torch.Tensor:
    """The base weight (fp32) with every merged adapter of `layer` taken out again, newest first."""
    weight = layer.base_weight().float()
    for name in reversed(layer.merged_adapters):
        adapter = layer.adapters[name]
        if isinstance(adapter, DoraAdapter):
            weight = adapter.unmerged_weight(layer, weight)
        else:
            weight = weight - adapter.delta(layer)
    return weight


class DoraAdapter(LoraAdapter):
    """LoRA plus a trainable magnitude per output unit: W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖."""

    custom_math = True

    def setup(self, layer: LoraLayer, config) -> None:
        if isinstance(layer, LoraParameter):
            raise TargetModuleError("DoRA (use_dora) is not available for raw parameters (target_parameters)")
        with torch.no_grad():
            norm = unit_norm(layer, layer.base_weight().float() + self.lora_delta(layer))
        # PEFT's shapes: (out,) for Linear/Embedding, (1, out, 1, ...) for Conv
        shape = (1, layer.out_features, *([1] * (norm.dim() - 2))) if isinstance(layer, LoraConv) else (-1,)
        self.lora_magnitude = nn.Parameter(norm.reshape(shape).to(self.lora_a.dtype))
        self.merged_norm: torch.Tensor | None = None  # ‖W0 + s·BA‖ at merge time, for an exact unmerge

    def tensor_roles(self) -> dict[str, str]:
        return {**super().tensor_roles(), "magnitude": "lora_magnitude"}

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"

    # ------------------------------------------------------------------ math
    def lora_delta(self, layer: LoraLayer) -> torch.Tensor:
        """s·B·A in the base weight's layout, fp32."""
        return layer.delta_from(self.lora_a.float(), self.lora_b.float()) * self.scaling

    def _factor(self, norm: torch.Tensor) -> torch.Tensor:
        """m / norm shaped like `norm` (weight layout)."""
        return self.lora_magnitude.float().reshape(norm.shape) / norm

    def delta(self, layer: LoraLayer) -> torch.Tensor:
        """The effective weight change f ⊙ (W0 + s·BA) − W0, fp32 (what a merge adds)."""
        weight = unmerged_base_weight(layer)
        lora = self.lora_delta(layer)
        return self._factor(unit_norm(layer, weight + lora)) * (weight + lora) - weight

    def unmerged_weight(self, layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
        """Undo this adapter's merge on `weight`: W / f − s·BA (f from the merge-time norm)."""
        return weight / self._factor(self.merged_norm) - self.lora_delta(layer)

    def _linear_output(self, layer: LoraLinear, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """PEFT 0.21's DoRA forward for Linear, operation for operation (bit-identical outputs).

        Its norm uses the LoRA weight formed as ``B(A(I)).T`` (two matmuls with an identity), which
        rounds differently from ``B @ A``; merge and the magnitude init use ``B @ A``, as PEFT does.
        """
        a, b = self.lora_a, self.lora_b
        eye = torch.eye(a.shape[1], device=a.device, dtype=a.dtype)
        lora_weight = F.linear(F.linear(eye, a), b).T.to(x.dtype)  # (out, in)
        weight = layer.base_weight().to(x.dtype)
        weight = weight.T if layer.fan_in_fan_out else weight
        norm = torch.linalg.norm(weight + self.scaling * lora_weight.detach(), dim=1).to(weight.dtype).detach()
        factor = (self.lora_magnitude / norm).view(1, -1)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            x_lora, base_out = x, result
            bias = getattr(layer.base, "bias", None)
            if bias is not None:
                base_out = base_out - bias
        else:  # PEFT: the dropped-out input through W0 alone (no bias)
            x_lora = self.dropout(x)
            base_out = F.linear(x_lora, weight)
        lora = F.linear(F.linear(x_lora, a), b)
        return result + ((factor - 1) * base_out + factor * lora * self.scaling)

    def output(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        x = layer.cast_input(x, self.lora_a.dtype)
        if isinstance(layer, LoraLinear):
            return self._linear_output(layer, x, result).to(result.dtype)
        lora_weight = self.lora_delta(layer).detach()
        weight = layer.base_weight().to(lora_weight.dtype)
        norm = unit_norm(layer, weight + lora_weight).detach()  # a constant for autograd (DoRA §4.3)
        factor = self.lora_magnitude / norm.reshape(self.lora_magnitude.shape)  # (out,) or (1, out, 1, ..)
        if isinstance(layer, LoraEmbedding):  # no dropout on token ids; the whole lookup is rescaled
            lora = factor * layer.project_b(layer.project_a(x, self.lora_a), self.lora_b) * self.scaling
            return (factor * result + lora).to(result.dtype)
        bias = getattr(layer.base, "bias", None)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            x_lora, base_out = x, result
        else:  # PEFT: the dropped-out input through W0 alone, no bias (LoraConv is the only kind left here)
            x_lora = self.dropout(x)
            base_out, bias = layer.base._conv_forward(x_lora, weight, None), None
        if bias is not None:  # W0·x without the bias: (N, out, *S) for Conv, (..., out) otherwise
            shape = (-1, *([1] * (base_out.dim() - 2))) if isinstance(layer, LoraConv) else (-1,)
            base_out = base_out - bias.view(shape)
        lora = layer.project_b(layer.project_a(x_lora, self.lora_a), self.lora_b)
        return result + ((factor - 1) * base_out + factor * lora * self.scaling)  # rounded by the layer, as PEFT

    # ------------------------------------------------------------------ merge
    def merge_into(self, layer: LoraLayer, safe: bool = True) -> None:
        lora = self.lora_delta(layer)
        norm = unit_norm(layer, unmerged_base_weight(layer) + lora)  # as the forward sees it
        current = layer.base_weight().float()
        delta = self._factor(norm) * (current + lora) - current
        if safe and not torch.isfinite(delta).all():
            raise ValueError("the adapter has NaN/inf weights; refusing to merge it into the base")
        layer.add_to_base_weight(delta)
        self.merged_norm = norm

    def unmerge_from(self, layer: LoraLayer) -> None:
        current = layer.base_weight().float()
        layer.add_to_base_weight(self.unmerged_weight(layer, current) - current)
        self.merged_norm = None
