"""Blockwise 4-bit quantisation (NF4 / FP4) with double quantisation, in plain PyTorch.

Bit-compatible with bitsandbytes 0.50 on CPU: the same packed bytes, the same scales and the
same dequantised values. Per block of ``blocksize`` values::

    absmax_b = max_i |w_i|,   q_i = argmin_k |w_i / absmax_b - code[k]|,   w'_i = code[q_i] * absmax_b

Two codes per byte, first element in the high nibble; an odd count is padded with the code of 0.
With ``double_quant`` the fp32 scales are shifted by their mean and stored as 8-bit codes
(``blockwise8``), which brings the cost to ≈ 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per value.

Speed: everything runs in chunks of ``_CHUNK`` values so temporaries stay in cache and are
recycled by the allocator instead of page-faulting fresh memory on every op. The nearest-code
search replaces ``torch.bucketize`` by a uniform cell table (cell → first candidate code and the
one decision threshold inside the cell), which gives bucketize's exact answer in two gathers.
"""

from __future__ import annotations

import functools
import math

import torch

from . import native
from .blockwise8 import quantize_blockwise
from .codes import QUANT_TYPES, _code, _dynamic_map, pair_table
from .state import SUPPORTED_DTYPES, NestedState, QuantState, check_blocksize

_CHUNK = 1 << 16  # values per quantisation pass (256 KiB of fp32 stays in L2)
_DEQUANT_CHUNK = 1 << 19  # values per dequantisation pass (few, large gathers: per-op overhead)


def _check_weight(weight: object) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor to quantise, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(
            f"only floating-point tensors can be quantised, got {weight.dtype}; an integer tensor is "
            "already quantised (or is not a weight)"
        )
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"4-bit quantisation takes float32, float16 or bfloat16 weights, got {weight.dtype}; "
            "cast it first, e.g. weight.float()"
        )
    if weight.numel() == 0:
        raise ValueError("cannot quantise an empty tensor")
    return weight.detach()


@functools.cache
def _cell_tables(quant_type: str) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Tables that make the nearest-code search two gathers and a compare.

    The code is sorted and cut at the midpoints ``bounds`` (ties go to the lower code, as
    bucketize does). [-1, 1] is split into ``cells`` equal cells, fine enough that no cell (widened
    by a margin far above float rounding) holds more than one bound. For the cell c of x:
    ``rank(x) = base[c] + (x > thr[c])``, where base[c] counts the bounds left of the cell and
    thr[c] is the next bound (+inf if none).
    """
    code = _code(quant_type)
    order = torch.argsort(code, stable=True)  # sorted position → 4-bit code
    ranked = code[order]
    bounds = (ranked[:-1] + ranked[1:]) / 2  # (15,) float32, exactly as bitsandbytes
    b64 = bounds.double()
    margin = 1e-4
    for cells in (256, 512, 1024, 2048, 4096, 8192):
        lo = torch.arange(cells + 1, dtype=torch.float64) * (2.0 / cells) - 1.0 - margin
        hi = lo + 2.0 / cells + 2 * margin
        inside = (b64[None, :] >= lo[:, None]) & (b64[None, :] <= hi[:, None])  # (cells+1, 15)
        if int(inside.sum(1).max()) <= 1:
            break
    else:  # pragma: no cover - the built-in codes all fit
        raise RuntimeError(f"code book of {quant_type} has bounds too close for the cell table")
    base = torch.searchsorted(b64, lo, right=False)  # (cells+1,) bounds strictly left of the cell
    thr = torch.cat([bounds, bounds.new_tensor([math.inf])])[base]  # (cells+1,) float32
    identity = torch.equal(order, torch.arange(16))
    return cells, base.to(torch.uint8), thr, None if identity else order.to(torch.uint8)


def _encode(x: torch.Tensor, quant_type: str) -> torch.Tensor:
    """(m,) float32 values scaled to [-1, 1] → (m,) uint8 index of the nearest code."""
    cells, base, thr, order = _cell_tables(quant_type)
    if x.device != base.device:  # the tables are built on the CPU; a no-op there
        base, thr = base.to(x.device), thr.to(x.device)
        order = None if order is None else order.to(x.device)
    cell = torch.add(x, 1.0).mul_(cells / 2).to(torch.int32)  # (m,) in [0, cells]
    q = torch.index_select(base, 0, cell)  # (m,) uint8
    q.add_(torch.lt(torch.index_select(thr, 0, cell), x))
    if order is not None:
        q = torch.index_select(order, 0, q.to(torch.int32))
    return q


def _check_finite(absmax: torch.Tensor) -> None:
    if not bool(torch.isfinite(absmax).all()):  # a NaN anywhere in a block makes its max NaN
        raise ValueError("weight contains NaN or inf; 4-bit quantisation needs finite values")


def _pack(q: torch.Tensor) -> torch.Tensor:
    """(2m,) uint8 codes → (m,) bytes, first code in the high nibble."""
    pairs = q.view(-1, 2)  # (m, 2)
    return pairs[:, 0].mul(16).add_(pairs[:, 1])


def quantize_4bit(
    weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4"
) -> tuple[torch.Tensor, QuantState]:
    """Quantise ``weight`` to 4-bit codes; returns ``(packed (ceil(n/2), 1) uint8, state)``."""
    weight = _check_weight(weight)
    check_blocksize(blocksize)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    flat = weight.reshape(-1)  # (n,) input dtype; converted to fp32 one chunk at a time
    n = flat.numel()
    full = n - n % blocksize
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=flat.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    step = max(blocksize, _CHUNK // blocksize * blocksize)
    for start in range(0, full, step):
        stop = min(start + step, full)
        a = flat[start:stop].float().view(-1, blocksize)  # (blocks, blocksize)
        am = torch.amax(a.abs(), dim=1, out=absmax[start // blocksize : stop // blocksize])
        _check_finite(am)
        x = a * (1.0 / am.clamp(min=1e-38))[:, None]  # (blocks, blocksize) in [-1, 1]
        packed[start // 2 : stop // 2] = _pack(_encode(x.view(-1), quant_type))
    if full < n:  # last, partial block: bitsandbytes divides here instead of multiplying
        tail = flat[full:].float()
        am = tail.abs().max().clamp(min=1e-38)
        _check_finite(am)
        absmax[-1] = am
        x = tail / am
        if x.numel() % 2:
            x = torch.nn.functional.pad(x, (0, 1))  # pad value 0 → the code of zero
        packed[full // 2 :] = _pack(_encode(x, quant_type))

    state = QuantState(
        absmax=absmax,
        shape=weight.shape,
        dtype=weight.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        code=_code(quant_type).to(flat.device, copy=True),  # unshared: safetensors refuses aliases
    )
    if double_quant:
        offset = absmax.mean()  # () fp32
        code2 = _dynamic_map().to(flat.device, copy=True)
        q_absmax, absmax2 = quantize_blockwise(absmax - offset, code2)
        state.absmax = q_absmax
        state.offset = offset
        state.state2 = NestedState(absmax=absmax2, code=code2)
    return packed.view(-1, 1), state


def block_scales(state: QuantState) -> torch.Tensor:
    """The (n_blocks,) float32 scales of ``state``, undoing the double quantisation if any."""
    return state.block_scales()


def _check_pair(packed: object, state: object) -> QuantState:
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a lorakit QuantState, got {type(state).__name__}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"packed 4-bit data must be a uint8 tensor, got {got}")
    state.validate()
    if packed.numel() != (state.numel + 1) // 2:
        raise ValueError(
            f"packed data has {packed.numel()} bytes but the state describes shape {tuple(state.shape)} "
            f"({(state.numel + 1) // 2} bytes); the state belongs to another tensor"
        )
    return state


def dequantize_4bit(
    packed: torch.Tensor, state: QuantState, out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rebuild the tensor: ``w[i] = code[q_i] * absmax[i // blocksize]`` (fp32 math, then cast).

    Returns shape ``state.shape`` in ``out_dtype`` (default ``state.dtype``). ``out``: a contiguous
    tensor of ``state.numel`` values in that dtype on packed's device to write into instead of a fresh
    one (a large fresh output costs more in page faults than the decoding itself)."""
    state = _check_pair(packed, state)
    dtype = state.dtype if out_dtype is None else out_dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {dtype}")
    data = packed.reshape(-1)  # (ceil(n/2),)
    n, bs = state.numel, state.blocksize
    full = n - n % bs
    if out is not None:
        if out.dtype != dtype or out.numel() != n or not out.is_contiguous() or out.device != packed.device:
            raise ValueError(f"out must be a contiguous {dtype} tensor of {n} values on {packed.device}, got "
                             f"{out.dtype} {tuple(out.shape)} on {out.device}")
        out = out.view(-1)
    if data.device.type == "cpu" and state.absmax.device.type == "cpu" and native.available(dtype):
        out = torch.empty(n, dtype=dtype) if out is None else out
        table = pair_table(state.quant_type)  # (256, 2) fp32
        native.dequant_full_blocks(data.contiguous(), _code(state.quant_type), table, state, out, full // bs)
        if full < n:
            pairs = table[data[full // 2 :].long()]  # (bytes, 2)
            out[full:] = pairs.view(-1)[: n - full] * block_scales(state)[-1]
        return out.view(state.shape)
    scales = block_scales(state)  # (n_blocks,) fp32
    # One float64 word per byte holds its two float32 code values, so a single 1-D gather
    # expands every byte into both of its values.
    table = pair_table(state.quant_type).to(packed.device).view(torch.float64).view(-1)  # (256,)
    out = torch.empty(n, dtype=dtype, device=packed.device) if out is None else out
    step = max(bs, _DEQUANT_CHUNK // bs * bs)  # values per chunk
    buf = (
        None
        if dtype == torch.float32
        else torch.empty(min(step, full), dtype=torch.float32, device=packed.device)
    )
    for start in range(0, full, step):
        stop = min(start + step, full)
        vals = out[start:stop] if buf is None else buf[: stop - start]  # (m,) fp32
        idx = data[start // 2 : stop // 2].to(torch.int32)
        torch.index_select(table, 0, idx, out=vals.view(torch.float64))
        sc = scales[start // bs : stop // bs, None]  # (blocks, 1)
        if buf is None:
            vals.view(-1, bs).mul_(sc)
        else:  # fp32 product, rounded once to the output dtype
            torch.mul(vals.view(-1, bs), sc, out=out[start:stop].view(-1, bs))
    if full < n:
        pairs = pair_table(state.quant_type).to(packed.device)[data[full // 2 :].long()]  # (bytes, 2)
        out[full:] = pairs.view(-1)[: n - full] * scales[-1]
    return out.view(state.shape)


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """NF4-quantise ``weight`` (fp32/fp16/bf16, any shape) in blocks of ``blocksize``.

    ``w ≈ NF4[q] * absmax_block``. Returns ``(packed, state)`` with packed uint8 of shape
    (ceil(numel/2), 1), byte-identical to ``bitsandbytes.functional.quantize_4bit(w, blocksize,
    quant_type="nf4", compress_statistics=double_quant)``.
    """
    return quantize_4bit(weight, blocksize, double_quant, "nf4")


def dequantize_nf4(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Inverse of ``quantize_nf4``: a tensor of ``state.shape`` / ``state.dtype``."""
    if isinstance(state, QuantState) and state.quant_type != "nf4":
        raise ValueError(f"state holds {state.quant_type} codes; use dequantize_4bit")
    return dequantize_4bit(packed, state)


def quantize_fp4(
    weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True
) -> tuple[torch.Tensor, QuantState]:
    """FP4 (1 sign, 2 exponent, 1 mantissa bit) counterpart of ``quantize_nf4``."""
    return quantize_4bit(weight, blocksize, double_quant, "fp4")


def dequantize_fp4(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Inverse of ``quantize_fp4``."""
    if isinstance(state, QuantState) and state.quant_type != "fp4":
        raise ValueError(f"state holds {state.quant_type} codes; use dequantize_4bit")
    return dequantize_4bit(packed, state)
