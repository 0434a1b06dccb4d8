"""8-bit blockwise quantisation with a 256-entry code: how double quantisation stores the scales.

Matches bitsandbytes 0.50's CPU kernel bit for bit. That kernel does not search the code
exactly: it maps each scaled value ``v`` in [-1, 1] to a 16-bit grid index
``k = trunc(fma((v + 1) · 0.5, 65535, 0.5))`` and reads the code index from a 65536-entry table
holding, for grid point ``g_k = 2k/65535 - 1``, the number of code midpoints below ``g_k``.
Values within ~1.5e-5 of a midpoint can therefore land on the farther code; we reproduce that.
"""

from __future__ import annotations

import torch

_GRID = 65536


def _grid_table(code: torch.Tensor) -> torch.Tensor:
    """(65536,) uint8: grid index → code index, built in float32 as the bnb kernel builds it."""
    code = code.float().cpu()
    mids = (code[:-1] + code[1:]) * 0.5  # (255,) float32
    k = torch.arange(_GRID, dtype=torch.float32)
    grid = (k + k) / 65535.0 - 1.0  # (65536,) float32 grid points in [-1, 1]
    return torch.bucketize(grid, mids, right=False).to(torch.uint8)  # count of midpoints < g


_tables: dict[bytes, torch.Tensor] = {}


def _cached_table(code: torch.Tensor) -> torch.Tensor:
    key = code.detach().float().cpu().numpy().tobytes()
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = _grid_table(code)
    return table


def quantize_blockwise(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m,) float32 → ((m,) uint8 codes, (ceil(m / blocksize),) float32 absmax).

    ``q_i ≈ argmin_k |x_i / absmax_b - code[k]|`` (grid-table rounding, see module doc).
    """
    m = x.numel()
    pad = (-m) % blocksize
    blocks = torch.nn.functional.pad(x.reshape(-1).float(), (0, pad)).view(-1, blocksize)  # (B, bs)
    absmax = blocks.abs().amax(dim=1)  # (B,)
    zero = absmax == 0
    inv = torch.where(zero, torch.zeros_like(absmax), 1.0 / absmax)  # the kernel multiplies by 1/absmax
    v = (blocks * inv[:, None]).clamp_(-1.0, 1.0)
    w = (v + 1.0) * 0.5  # float32, as the kernel rounds it
    # fma(w, 65535, 0.5) rounds once: w·65535 + 0.5 is exact in float64, then one rounding to float32.
    k = w.double().mul_(65535.0).add_(0.5).float().to(torch.int32)  # (B, bs) truncation
    table = _cached_table(code).to(x.device)
    q = torch.index_select(table, 0, k.view(-1)).view(-1, blocksize)
    q[zero] = 0  # an all-zero block stores code 0 and absmax 0
    return q.view(-1)[:m], absmax


def dequantize_blockwise(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: ``x_i = code[q_i] * absmax[i // blocksize]`` (float32)."""
    m = q.numel()
    vals = code.float()[q.reshape(-1).long()]  # (m,)
    pad = (-m) % blocksize
    blocks = torch.nn.functional.pad(vals, (0, pad)).view(-1, blocksize)  # (B, bs)
    return (blocks * absmax.float()[:, None]).view(-1)[:m].contiguous()
