"""The LoRA add ``y += s·(x·Aᵀ)·Bᵀ`` and its multi-adapter form (Punica's SGMV) as Triton kernels.

Both are two kernels, as in Punica: *shrink* ``u = x·Aᵀ`` (rank r, fp32 accumulation, rounded
to x's dtype like the PyTorch path's ``F.linear``) and *expand* ``y += s·u·Bᵀ``, which
accumulates into the base output in place, so no (T, out) temporary exists.

Multi-adapter (serving): every row picks one adapter (or none). The rows are sorted by adapter
once per batch (a stable argsort, O(T log T) on the GPU) and cut into segments; each kernel
program works on a (rows of one segment) × (columns) tile and reads that segment's factors from
stacked (L, r_max, in) / (L, out, r_max) tensors, zero-padded past each adapter's rank. Row
indices are passed through, so x is gathered and y scattered in place: no permuted copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakit.kernels import interpreting


@triton.jit
def _shrink_kernel(
    x, a, u, rows, seg_start, seg_slot, K, R, sxm, sxk, sal, sar, sak, sum_, sur,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """u[rows[i]] = x[rows[i]] · A[slot]ᵀ for the rows i of segment program_id(0)."""
    seg = tl.program_id(0)
    start = tl.load(seg_start + seg)
    end = tl.load(seg_start + seg + 1)
    slot = tl.load(seg_slot + seg).to(tl.int64)
    offs_i = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_i < end
    r_idx = tl.load(rows + offs_i, mask=row_ok, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x + r_idx[:, None] * sxm + offs_k[None, :] * sxk,
                     mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        at = tl.load(a + slot * sal + offs_r[:, None] * sar + offs_k[None, :] * sak,
                     mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
        if IEEE:
            acc += tl.dot(xt, tl.trans(at), input_precision="ieee")
        elif UPCAST:  # interpreter: its dot multiplies bf16 storage as integers; fp32 products are exact
            acc += tl.dot(xt.to(tl.float32), tl.trans(at.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(at))
    tl.store(u + r_idx[:, None] * sum_ + offs_r[None, :] * sur, acc.to(u.dtype.element_ty),
             mask=row_ok[:, None] & (offs_r[None, :] < R))


@triton.jit
def _expand_kernel(
    u, b, y, scales, rows, seg_start, seg_slot, N, R, sum_, sur, sbl, sbn, sbr, sym, syn,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[rows[i], n] += scale[slot] · u[rows[i]] · B[slot][n]ᵀ for segment program_id(0)."""
    seg = tl.program_id(0)
    start = tl.load(seg_start + seg)
    end = tl.load(seg_start + seg + 1)
    slot = tl.load(seg_slot + seg).to(tl.int64)
    offs_i = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_i < end
    r_idx = tl.load(rows + offs_i, mask=row_ok, other=0).to(tl.int64)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    ut = tl.load(u + r_idx[:, None] * sum_ + offs_r[None, :] * sur,
                 mask=row_ok[:, None] & (offs_r[None, :] < R), other=0.0)
    bt = tl.load(b + slot * sbl + offs_n[:, None] * sbn + offs_r[None, :] * sbr,
                 mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
    if IEEE:
        delta = tl.dot(ut, tl.trans(bt), input_precision="ieee")
    elif UPCAST:
        delta = tl.dot(ut.to(tl.float32), tl.trans(bt.to(tl.float32)), input_precision="ieee")
    else:
        delta = tl.dot(ut, tl.trans(bt))
    scale = tl.load(scales + slot)
    mask = row_ok[:, None] & (offs_n[None, :] < N)
    ptrs = y + r_idx[:, None] * sym + offs_n[None, :] * syn
    old = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (old + delta * scale).to(y.dtype.element_ty), mask=mask)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(int(n)))


def segments(row_adapter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sort rows by adapter: (rows (T',) int32, seg_start (S+1,) int32, seg_slot (S,) int32, max_len).

    ``row_adapter`` (T,) holds each row's adapter slot, or -1 for "no adapter" (those rows are left
    out). Sorting is stable, so rows keep their order inside a segment.
    """
    ids = row_adapter.reshape(-1).long()
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    keep = sorted_ids >= 0
    order, sorted_ids = order[keep], sorted_ids[keep]
    slots, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    starts = torch.zeros(slots.numel() + 1, dtype=torch.int64, device=ids.device)
    starts[1:] = torch.cumsum(counts, 0)
    max_len = int(counts.max()) if counts.numel() else 0
    return order.to(torch.int32), starts.to(torch.int32), slots.to(torch.int32), max_len


def sgmv_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    scales: torch.Tensor,
    row_adapter: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    segs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """In place: ``y[i] += scales[k]·(x[i]·A[k]ᵀ)·B[k]ᵀ`` with ``k = row_adapter[i]`` (-1: unchanged).

    x (T, in), y (T, out) (2-D, any strides), a_stack (L, r, in), b_stack (L, out, r) — adapters of
    lower rank zero-padded to r — scales (L,) fp32. ``u`` (T, r), if given, receives x·Aᵀ (rows
    with an adapter). ``segs``: :func:`segments` of ``row_adapter``, computed once and shared by
    every layer of a forward pass (it costs a sort and a device sync). Returns y.
    """
    t, k_in = x.shape
    n_out = y.shape[1]
    n_ad, r, _ = a_stack.shape
    rows, seg_start, seg_slot, max_len = segs if segs is not None else segments(row_adapter)
    if max_len == 0 or t == 0:
        return y
    if u is None:
        u = torch.empty(t, r, dtype=x.dtype, device=x.device)  # rows without an adapter are never read
    ieee = x.dtype == torch.float32
    bm, br = 16, _pow2(r)
    n_seg = seg_slot.numel()
    _shrink_kernel[(n_seg, triton.cdiv(max_len, bm))](
        x, a_stack, u, rows, seg_start, seg_slot, k_in, r, x.stride(0), x.stride(1),
        a_stack.stride(0), a_stack.stride(1), a_stack.stride(2), u.stride(0), u.stride(1),
        IEEE=ieee, UPCAST=interpreting(), BLOCK_M=bm, BLOCK_R=br, BLOCK_K=32,
    )
    bn = 64
    _expand_kernel[(n_seg, triton.cdiv(max_len, bm), triton.cdiv(n_out, bn))](
        u, b_stack, y, scales.float().contiguous(), rows, seg_start, seg_slot, n_out, r,
        u.stride(0), u.stride(1), b_stack.stride(0), b_stack.stride(1), b_stack.stride(2),
        y.stride(0), y.stride(1), IEEE=ieee, UPCAST=interpreting(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br,
    )
    return y


def lora_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """In place: ``y += scaling·(x·Aᵀ)·Bᵀ`` for one adapter; x (..., in), y (..., out) contiguous,
    A (r, in), B (out, r). Returns ``u = x·Aᵀ`` (T, r), which the backward pass needs.

    The single-adapter case of :func:`sgmv_add_` (one segment holding every row)."""
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.view(-1, y.shape[-1])  # a view: the kernel writes into y itself
    ids = torch.zeros(x2.shape[0], dtype=torch.int32, device=x.device)
    scales = torch.tensor([float(scaling)], dtype=torch.float32, device=x.device)
    u = torch.empty(x2.shape[0], a.shape[0], dtype=x.dtype, device=x.device)
    sgmv_add_(y2, x2, a.unsqueeze(0), b.unsqueeze(0), scales, ids, u=u)
    return u
