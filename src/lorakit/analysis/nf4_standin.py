"""Memory stand-ins for 4-bit (NF4, double-quantised) Linear layers, for planning only.

Storage per weight of n = out·in elements: n/2 bytes of packed codes, n/64 uint8 block scales,
n/(64·256) fp32 second-level scales:  ≈ 0.5157 bytes per parameter.
Forward and backward each dequantise W to the compute dtype (a transient (out, in) tensor) and
save nothing of size n for backward, as bitsandbytes' and lorakit's 4-bit matmuls do.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK = 64  # NF4 block size
BLOCK2 = 256  # second-level (double-quant) block size


class _DequantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, bias, out_features: int, in_features: int):
        ctx.shape = (out_features, in_features)
        weight = torch.empty(out_features, in_features, dtype=x.dtype, device=x.device)  # dequantised, transient
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        weight = torch.empty(*ctx.shape, dtype=grad_out.dtype, device=grad_out.device)  # dequantised again
        return grad_out @ weight, None, None, None, None


class Nf4Standin(nn.Module):
    """Holds buffers the size of a 4-bit weight; computes with an uninitialised dequantised weight."""

    lorakit_linear = True  # lorakit's targeting treats it as a Linear

    def __init__(self, base: nn.Linear, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        n = base.in_features * base.out_features
        device = base.weight.device
        self.register_buffer("packed", torch.empty(math.ceil(n / 2), dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.empty(math.ceil(n / BLOCK), dtype=torch.uint8, device=device))
        self.register_buffer("absmax2", torch.empty(math.ceil(n / BLOCK / BLOCK2), device=device))
        self.bias = base.bias
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantMatmul.apply(x.to(self.compute_dtype), self.packed, self.bias, self.out_features,
                                    self.in_features)


def quantize_standins(model: nn.Module) -> int:
    """Swap every nn.Linear except the output head for a stand-in, in place; returns how many."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        setattr(parent, child, Nf4Standin(base, base.weight.dtype))
    return len(names)
