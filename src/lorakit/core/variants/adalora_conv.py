"""AdaLoRA on nn.Conv2d, as PEFT's ``SVDConv2d`` computes it.

The SVD triplets are flat matrices over the whole kernel (PEFT's layout and file format):

    Q = A (r, in·kh·kw),  Λ = E (r, 1),  P = B (out, r)
    ΔW = (s · P·(Q ⊙ Λ)).reshape(out, in, kh, kw)      s: AdaLoRA's rule in adapter_weights.scaling

and the layer output is ``conv(x, W) + conv(dropout(x), ΔW)`` with the base's stride, padding
and dilation (zero padding, as PEFT). The budget schedule, the orthogonality penalty and the
saved keep-mask are those of Linear AdaLoRA (see adalora.py): they only see the 2-D factors.
PEFT supports Conv2d only, with groups = 1; so does this.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.core.adapter_weights import apply_scaling
from lorakit.core.layers import LoraConv, LoraLayer
from lorakit.core.variants.adalora import AdaLoraAdapter, AdaLoraConfig
from lorakit.errors import TargetModuleError


class AdaLoraConvAdapter(AdaLoraAdapter):
    """AdaLoRA triplets on a Conv2d: Q (r, in·k), Λ (r, 1), P (out, r)."""

    def setup(self, layer: LoraLayer, config: AdaLoraConfig) -> None:
        base = layer.base
        if not isinstance(layer, LoraConv) or not isinstance(base, nn.Conv2d) or base.groups != 1:
            what = type(base).__name__ + (f" with groups={base.groups}" if getattr(base, "groups", 1) != 1 else "")
            raise TargetModuleError(f"AdaLoRA on convolutions supports nn.Conv2d with groups=1 only (as PEFT), "
                                    f"not {what}; exclude it from target_modules or use plain LoRA there")
        # the conv-shaped factors the layer created become PEFT's flat SVD matrices
        self.lora_a = nn.Parameter(self.lora_a.data.reshape(self.rank, -1))  # (r, in·kh·kw)
        self.lora_b = nn.Parameter(self.lora_b.data.reshape(-1, self.rank))  # (out, r)
        self.init_svd_factors(config)

    def delta(self, layer: LoraLayer) -> torch.Tensor:
        """ΔW in the kernel's shape (out, in, kh, kw), fp32."""
        product = self.lora_b.float() @ (self.lora_a * self.lora_e).float()
        return apply_scaling(product, self.alpha, self.ranknum, "adalora").reshape(layer.base.weight.shape)

    def output(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        base = layer.base
        x = layer.cast_input(x, self.lora_a.dtype)
        kernel = apply_scaling(self.lora_b @ (self.lora_a * self.lora_e), self.alpha, self.ranknum,
                               "adalora").reshape(base.weight.shape)  # PEFT's order of operations
        y = F.conv2d(self.dropout(x), kernel, stride=base.stride, padding=base.padding, dilation=base.dilation)
        return (result + y).to(result.dtype)  # PEFT's in-place `result +=`: summed in fp32, rounded once
