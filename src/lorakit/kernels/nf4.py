"""NF4/FP4 weights decoded inside Triton matmuls: ``y = x·dequant(W)ᵀ (+ b)`` and ``g·dequant(W)``.

Each program decodes the (BLOCK_N, BLOCK_K) tile of W it needs straight from the packed bytes:
element (n, k) is value ``i = n·in + k`` of the flattened weight, its byte is ``packed[i // 2]``
(high nibble first), its value ``code[nibble] · scale[i // blocksize]``. The fp32 block scales
are rebuilt once per call with PyTorch (``block_scales``: 1/64 of the weight's values at
blocksize 64), so the kernels do one fp32 multiply per value and give the same bits as
``dequantize_4bit``; FMA contraction is switched off where it could change them.
"""

from __future__ import annotations

from typing import Protocol

import torch
import triton
import triton.language as tl

from lorakit.kernels import interpreting


class QuantState(Protocol):
    """What the kernels read of a 4-bit weight's state (:class:`lorakit.quant.QuantState` is one).

    A protocol rather than an import: quant dispatches to these kernels, so the kernels must not
    import quant (the code tables and scale decoding come in through the state's methods).
    """

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int

    @property
    def numel(self) -> int: ...

    def code_table(self) -> torch.Tensor: ...

    def block_scales(self) -> torch.Tensor: ...

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _cast(v, dtype: tl.constexpr):
    """fp32 -> dtype, rounding to nearest even as ``Tensor.to`` does (spelled out for bf16, where
    the interpreter's own cast truncates)."""
    if dtype == tl.bfloat16:
        u = v.to(tl.uint32, bitcast=True)
        u = u + ((u >> 16) & 1) + 0x7FFF
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _decode_tile(packed, code, scales, offs_n, offs_k, N, K, BS: tl.constexpr):
    """(len(offs_n), len(offs_k)) fp32 tile of W; zeros outside (N, K)."""
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    idx = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]  # flat value index
    byte = tl.load(packed + idx // 2, mask=mask, other=0).to(tl.int32)
    nib = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
    val = tl.load(code + nib, mask=mask, other=0.0)
    scale = tl.load(scales + idx // BS, mask=mask, other=0.0)
    return val * scale


@triton.jit
def _dequant_kernel(packed, code, scales, out, n, BS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(packed + offs // 2, mask=mask, other=0).to(tl.int32)
    nib = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
    val = tl.load(code + nib, mask=mask, other=0.0) * tl.load(scales + offs // BS, mask=mask, other=0.0)
    tl.store(out + offs, _cast(val, out.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_linear_kernel(
    x, packed, code, scales, bias, y, M, N, K, sxm, sxk, sym, syn,
    HAS_BIAS: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y (M, N) = x (M, K) · Wᵀ (+ bias), W (N, K) decoded per tile; fp32 accumulation."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xm = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        xt = tl.load(x + offs_m[:, None] * sxm + offs_k[None, :] * sxk, mask=xm, other=0.0)
        wt = _cast(_decode_tile(packed, code, scales, offs_n, offs_k, N, K, BS), xt.dtype)  # (BN, BK)
        if IEEE:
            acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
        elif UPCAST:  # interpreter: its dot multiplies bf16 storage as integers; fp32 products are exact
            acc += tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(wt))
    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    ym = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y + offs_m[:, None] * sym + offs_n[None, :] * syn, acc.to(y.dtype.element_ty), mask=ym)


@triton.jit
def _nf4_grad_input_kernel(
    g, packed, code, scales, gx, M, N, K, sgm, sgn, sxm, sxk,
    BS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gx (M, K) = g (M, N) · W (N, K), W decoded per tile; fp32 accumulation."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        gm = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        gt = tl.load(g + offs_m[:, None] * sgm + offs_n[None, :] * sgn, mask=gm, other=0.0)
        wt = _cast(_decode_tile(packed, code, scales, offs_n, offs_k, N, K, BS), gt.dtype)  # (BN, BK)
        if IEEE:
            acc += tl.dot(gt, wt, input_precision="ieee")
        elif UPCAST:
            acc += tl.dot(gt.to(tl.float32), wt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(gt, wt)
    xm = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(gx + offs_m[:, None] * sxm + offs_k[None, :] * sxk, acc.to(gx.dtype.element_ty), mask=xm)


def _operands(packed: torch.Tensor, state: QuantState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed bytes (1-D), the (16,) fp32 code book and the (n_blocks,) fp32 scales on packed's device."""
    code = state.code_table().to(packed.device)
    return packed.reshape(-1).contiguous(), code, state.block_scales().contiguous()


def dequantize(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequantize_4bit`` as one Triton kernel: the same values, shape ``state.shape``."""
    dtype = dtype or state.dtype
    data, code, scales = _operands(packed, state)
    out = torch.empty(state.numel, dtype=dtype, device=packed.device)
    block = 1024
    _dequant_kernel[(triton.cdiv(state.numel, block),)](
        data, code, scales, out, state.numel, BS=state.blocksize, BLOCK=block, enable_fp_fusion=False
    )
    return out.view(state.shape)


def _tiles(m: int) -> tuple[int, int, int]:
    return (16 if m <= 16 else 32 if m <= 32 else 64), 64, 32


def linear(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x · dequant(W)ᵀ + bias`` without materialising W: x (..., in) → (..., out), in x's dtype."""
    n_out, n_in = (int(d) for d in state.shape)
    x2 = x.reshape(-1, n_in)
    m = x2.shape[0]
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    data, code, scales = _operands(packed, state)
    bm, bn, bk = _tiles(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n_out, bn))
    _nf4_linear_kernel[grid](
        x2, data, code, scales, bias if bias is not None else y, y, m, n_out, n_in,
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, BS=state.blocksize, IEEE=x.dtype == torch.float32,
        UPCAST=interpreting(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, enable_fp_fusion=False,
    )
    return y.view(*x.shape[:-1], n_out)


def grad_input(g: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``g · dequant(W)``: g (..., out) → (..., in), the input gradient of :func:`linear`."""
    n_out, n_in = (int(d) for d in state.shape)
    g2 = g.reshape(-1, n_out)
    m = g2.shape[0]
    gx = torch.empty(m, n_in, dtype=g.dtype, device=g.device)
    data, code, scales = _operands(packed, state)
    bm, bn, bk = _tiles(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n_in, bk))
    _nf4_grad_input_kernel[grid](
        g2, data, code, scales, gx, m, n_out, n_in, g2.stride(0), g2.stride(1), gx.stride(0), gx.stride(1),
        BS=state.blocksize, IEEE=g.dtype == torch.float32, UPCAST=interpreting(), BLOCK_M=bm, BLOCK_N=bk, BLOCK_K=bn,
        enable_fp_fusion=False,
    )
    return gx.view(*g.shape[:-1], n_in)


class NF4Linear(torch.autograd.Function):
    """Autograd wrapper: forward :func:`linear`, backward :func:`grad_input` (W gets no gradient)."""

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        ctx.packed, ctx.state = packed, state
        return linear(x, packed, state, bias)

    @staticmethod
    def backward(ctx, grad_out):
        gx = grad_input(grad_out.contiguous(), ctx.packed, ctx.state) if ctx.needs_input_grad[0] else None
        return gx, None, None, None
