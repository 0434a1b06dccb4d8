"""LoRA on Linear-like layers: nn.Linear, transformers' Conv1D (GPT-2) and 4-bit linears.

h = W·x + b + scaling · B·(A·dropout(x)),  A: (r, in), B: (out, r)

The training hot path is one autograd function (:class:`_FusedLoraLinear`) that saves the input
once, never computes a gradient for the frozen W, shares g·B between the gradients of x and A,
and accumulates the LoRA output in place into the base output.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import lorakit.kernels as kernels
from lorakit.core.layers.base import LoraAdapter, LoraLayer, output_may_be_kept
from lorakit.quant.linear4bit import KeptWeight, dense_for_step

HALF = (torch.bfloat16, torch.float16)


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D without importing transformers here."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or getattr(module, "lorakit_linear", False)


class LoraLinear(LoraLayer):
    row_gather = True  # x·Aᵀ then u·Bᵀ on the last axis: mixed batches gather per row

    def __init__(self, base: nn.Module, fan_in_fan_out: bool | None = None):
        super().__init__(base)
        # Conv1D stores its weight as (in, out)
        self.fan_in_fan_out = is_conv1d(base) if fan_in_fan_out is None else fan_in_fan_out

    @property
    def in_features(self) -> int:
        if is_conv1d(self.base):
            return self.base.weight.shape[0]
        return self.base.in_features

    @property
    def out_features(self) -> int:
        if is_conv1d(self.base):
            return self.base.weight.shape[1]
        return self.base.out_features

    def project_a(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return F.linear(x, a)  # (..., in) -> (..., r)

    def project_b(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear(u, b)  # (..., r) -> (..., out)

    def delta_from(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        delta = b @ a  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not torch.is_grad_enabled():
            adapter = self._inference_adapter()
            if adapter is not None:
                return self._inference_forward(x, adapter, args, kwargs)
        adapter = self._fusable_adapter(x)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.base
        if isinstance(adapter.dropout, nn.Identity):
            x_lora = x
        else:  # half-precision x: drop out of its fp32 cast, as the general path (and PEFT) do
            x_lora = adapter.dropout(x.to(adapter.lora_a.dtype))
        bias = base.bias
        if getattr(base, "lorakit_4bit", False) and bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)  # frozen (_fusable_adapter): an fp32 bias on a bf16-compute layer
        if (getattr(base, "lorakit_4bit", False) and adapter.lora_a.dtype == x.dtype
                and kernels.enabled_for(x, base.weight)):
            from lorakit.kernels.qlora import QLoraLinear  # CUDA + triton: NF4 decoded inside the matmul

            return QLoraLinear.apply(
                x.contiguous(), x_lora if x_lora is not x else None, base.weight, base.quant_state, bias,
                adapter.lora_a, adapter.lora_b, adapter.scaling,
            )
        if getattr(base, "lorakit_4bit", False):  # QLoRA: one dequantisation for forward (and backward if kept)
            weight, kept = dense_for_step(base, x.dtype, keep=x.requires_grad)  # (out, in); scratch unless kept
            return _FusedLoraLinear.apply(
                x, x_lora if x_lora is not x else None, weight, bias, adapter.lora_a, adapter.lora_b,
                adapter.scaling, base if kept is None else kept,
            )
        return _FusedLoraLinear.apply(
            x, x_lora if x_lora is not x else None, base.weight, base.bias, adapter.lora_a, adapter.lora_b,
            adapter.scaling,
        )

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, routing) -> torch.Tensor:
        """One adapter per row; on CUDA with triton (serving, no autograd) as Punica-style SGMV kernels."""
        # x.is_cuda first: the environment lookups of enabled_for cost more than a decode step's LoRA math
        # (the SGMV kernels read module adapters only: pool-served adapters take the pool's gather)
        if (not torch.is_grad_enabled() and not self.fan_in_fan_out and not routing.pooled
                and (x.is_cuda or kernels.interpreting()) and kernels.enabled_for(x, result)):
            from lorakit.kernels.serving import sgmv_mixed_forward

            out = sgmv_mixed_forward(self, x, result, routing)
            if out is not None:
                return out
        return super().mixed_forward(x, result, routing)

    def _inference_adapter(self) -> LoraAdapter | None:
        """The one plain adapter of a no-grad forward (generation, serving, evaluation), or None.

        A decode step runs this layer once per token with one row: there the LoRA math is two
        tiny GEMVs and much of the time goes to Python and dispatch, so this path skips the
        general forward's checks, dropout module and temporaries (see :meth:`_inference_forward`).
        """
        if self.disabled or len(self.active_adapters) != 1 or self.routing is not None:
            return None
        name = self.active_adapters[0]
        adapter = self.adapters._modules.get(name)
        if adapter is None or adapter.custom_math or name in self.merged_adapters:
            return None
        if self.training and type(adapter._modules["dropout"]) is not nn.Identity:
            return None
        return adapter

    def _inference_forward(self, x: torch.Tensor, adapter: LoraAdapter, args: tuple, kwargs: dict) -> torch.Tensor:
        """base(x) + s·(x·Aᵀ)·Bᵀ without autograd: PEFT's ops and rounding order, with the adds in place.

        The product is scaled and added into the base output in place (both are fresh tensors
        here, unless a forward hook on the base may keep its output: then out of place), which
        rounds exactly as ``(result + t·s).to(result.dtype)``: a loaded PEFT adapter still gives
        bit-identical outputs.
        """
        result = self.base(x, *args, **kwargs)
        lora_a = adapter.lora_a  # attributes, not _parameters: a variant may own A elsewhere (shared A)
        if x.dtype != lora_a.dtype:
            x = x.to(lora_a.dtype)
        t = F.linear(F.linear(x, lora_a), adapter.lora_b)
        t.mul_(adapter.scaling)
        if output_may_be_kept(self.base):
            return (result + t).to(result.dtype)
        return result.add_(t)

    def _fusable_adapter(self, x: torch.Tensor):
        """The single adapter the fused training path can run, or None to take the general path.

        Without autograd the general path runs instead: it adds (B·A·x)·s in PEFT's order, so a
        loaded PEFT adapter gives bit-identical outputs; the fused path folds s into the GEMM
        (same math, different rounding) to save a pass over the (T, out) output.
        """
        if not torch.is_grad_enabled() or not x.requires_grad and not self.training:
            return None
        if torch.is_autocast_enabled(x.device.type):  # backward() runs outside autocast: mixed dtypes there
            return None
        if self.disabled or self.routing is not None or len(self.active_adapters) != 1:
            return None
        base = self.base
        if getattr(base, "lorakit_4bit", False):  # a 4-bit Linear computing in x's dtype
            if (base.compute_dtype or base.quant_state.dtype) != x.dtype:
                return None
            if base.bias is not None and base.bias.requires_grad:  # a frozen bias is cast to x's dtype, as
                return None  # Linear4bit.forward casts it to its compute dtype
        elif type(base) is not nn.Linear or base.weight.requires_grad:
            return None
        name = self.active_adapters[0]
        if name in self.merged_adapters or name not in self.adapters:
            return None
        adapter = self.adapters[name]
        if adapter.custom_math:  # variants (DoRA, ...) have their own forward
            return None
        if x.device != adapter.lora_a.device:
            return None
        if x.dtype != adapter.lora_a.dtype and not (adapter.lora_a.dtype == torch.float32 and x.dtype in HALF):
            return None  # half-precision x with fp32 factors (PEFT's default for bf16/fp16 bases) is fused too
        if not getattr(base, "lorakit_4bit", False) and base.weight.dtype != x.dtype:
            return None
        return adapter


class _FusedLoraLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x_d·Aᵀ)·Bᵀ with W frozen; x_d is dropout(x) or x itself (None).

    ``weight_src`` (4-bit bases only): where backward gets W — the Linear4bit to dequantise it
    again (nothing dense is held between forward and backward), or a ``KeptWeight`` holding the
    forward's copy within the keep budget (``lorakit.quant.set_dequant_keep_budget``). A weight not
    kept is the thread's dequantisation scratch buffer, so it is never saved for backward.

    Half-precision x with fp32 factors (a bf16/fp16 base, QLoRA's bf16 compute): the base GEMMs run
    in x's dtype on W dequantised straight to it. u = x_d·Aᵀ runs in fp32 on x_d cast once (that
    fp32 copy is what backward keeps, as PEFT's A projection keeps its fp32 input). The expansion is one
    half-precision GEMM accumulated in place into the base output, y = h(x·Wᵀ) + s·h(u)·h(B)ᵀ with
    h() rounding to x's dtype, fp32 products and sums, and one rounding of y at the end. PEFT's bnb
    4-bit layer instead forms s·u·Bᵀ in fp32, rounds it to bf16, then adds (its own rounding): both
    orders put one rounding of the LoRA term's size (ours on u and B, PEFT's on the term) and one
    of y's size into y, so they agree to a few bf16 ulps of y, not bit for bit. The mixed-dtype
    in-place add that would keep the term in fp32 (``y.add_(fp32)``) costs a fresh (T, out) fp32
    buffer and a copy per call (TensorIterator computes in fp32 and casts back), 4× the GEMM here.
    Backward mirrors it: g is cast to fp32 once for g·B and both factor gradients (fp32 as PEFT's),
    and g_B = g·B is added into the half-precision g·W as h(g_B)·h(A), one in-place GEMM.
    """

    @staticmethod
    def forward(ctx, x, x_drop, weight, bias, lora_a, lora_b, scaling, weight_src=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (T, in)
        xd2 = x2 if x_drop is None else x_drop.reshape(-1, shape[-1])
        mixed = lora_a.dtype != x.dtype  # half-precision x, fp32 factors
        xl = xd2.to(lora_a.dtype)  # the LoRA branch's input: one cast of x (dropout's output is fp32 already)
        u = xl @ lora_a.T  # (T, r)
        if bias is not None:
            y = torch.addmm(bias, x2, weight.T)  # (T, out)
        else:
            y = x2 @ weight.T
        if mixed:  # u and B rounded to y's dtype, products summed in fp32 into y (see the class docstring)
            y.addmm_(u.to(y.dtype), lora_b.to(y.dtype).T, alpha=scaling)
        else:
            y.addmm_(u, lora_b.T, alpha=scaling)  # accumulate s·u·Bᵀ into y: no (T, out) temporary
        ctx.weight_src = weight_src
        ctx.save_for_backward(xl, u, weight if weight_src is None else None, lora_a, lora_b)
        ctx.scaling = scaling
        ctx.shared_input = x_drop is None
        ctx.drop_dtype = None if x_drop is None else x_drop.dtype
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.in_shape = shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xl, u, weight, lora_a, lora_b = ctx.saved_tensors
        src, ctx.weight_src = ctx.weight_src, None  # a kept weight's reservation ends with this step
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (T, out)
        mixed = lora_b.dtype != g.dtype
        gl = g.to(lora_b.dtype) if mixed else g  # the LoRA branch's output gradient, fp32: one cast
        g_b = gl @ lora_b  # (T, r): shared by dA and dx
        grad_x = grad_xd = grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if src is not None:  # 4-bit base: the forward's copy if kept, else dequantised again
                weight = src.weight if isinstance(src, KeptWeight) else dense_for_step(src, g.dtype, keep=False)[0]
            grad_x = g @ weight  # (T, in); no gradient is ever formed for the frozen W
            if not ctx.shared_input:
                grad_xd = (s * g_b @ lora_a).to(ctx.drop_dtype).view(ctx.in_shape)
            elif mixed:  # as in forward: g·B and A rounded to g's dtype, summed in fp32 into g·W
                grad_x.addmm_(g_b.to(g.dtype), lora_a.to(g.dtype), alpha=s)
            else:
                grad_x.addmm_(g_b, lora_a, alpha=s)
            grad_x = grad_x.view(ctx.in_shape)
        if ctx.needs_input_grad[4]:
            grad_a = (g_b.T @ xl) * s  # (r, in)
        if ctx.needs_input_grad[5]:
            grad_b = (u.T @ gl).T * s  # (out, r); uᵀ·g runs ~1.6× faster than gᵀ·u on CPU BLAS
        if ctx.bias_grad:
            grad_bias = g.sum(0)
        return grad_x, grad_xd, None, grad_bias, grad_a, grad_b, None, None
