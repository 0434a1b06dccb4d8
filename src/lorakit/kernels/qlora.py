"""The 4-bit LoRA linear on the GPU: NF4 decoded inside the base matmul, the LoRA add fused after it.

``y = x·dequant(W)ᵀ + b + s·(x_d·Aᵀ)·Bᵀ``: forward runs :func:`lorakit.kernels.nf4.linear` (no
dense W in memory) and :func:`lorakit.kernels.lora.lora_add_` (in place into y); backward runs
:func:`lorakit.kernels.nf4.grad_input` for ``g·W`` and cuBLAS for the rank-r products, with the
same algebra as the CPU path (``lorakit.core.layers.linear._FusedLoraLinear``).
"""

from __future__ import annotations

import torch

from . import lora, nf4


class QLoraLinear(torch.autograd.Function):
    """x, x_drop (dropout(x) or None), packed, state, bias, A, B, scaling -> y."""

    @staticmethod
    def forward(ctx, x, x_drop, packed, state, bias, lora_a, lora_b, scaling):
        xd = x if x_drop is None else x_drop
        y = nf4.linear(x, packed, state, bias)  # (..., out)
        u = lora.lora_add_(y, xd, lora_a, lora_b, scaling)  # (T, r); y += s·u·Bᵀ in place
        ctx.save_for_backward(xd.reshape(-1, xd.shape[-1]), u, lora_a, lora_b)
        ctx.packed, ctx.state, ctx.scaling = packed, state, scaling
        ctx.shared_input = x_drop is None
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.in_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad_out):
        xd2, u, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()  # (T, out)
        g_b = g @ lora_b  # (T, r)
        grad_x = grad_xd = grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_x = nf4.grad_input(g, ctx.packed, ctx.state)  # (T, in), W decoded per tile
            if ctx.shared_input:
                grad_x.addmm_(g_b, lora_a, alpha=s)
            else:
                grad_xd = (s * g_b @ lora_a).view(ctx.in_shape)
            grad_x = grad_x.view(ctx.in_shape)
        if ctx.needs_input_grad[5]:
            grad_a = (g_b.T @ xd2) * s  # (r, in)
        if ctx.needs_input_grad[6]:
            grad_b = (u.T @ g).T * s  # (out, r)
        if ctx.bias_grad:
            grad_bias = g.sum(0)
        return grad_x, grad_xd, None, None, grad_bias, grad_a, grad_b, None
