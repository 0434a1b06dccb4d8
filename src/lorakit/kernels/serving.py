"""The multi-adapter (mixed batch) LoRA layer path on the GPU: rows grouped by adapter, SGMV kernels.

Replaces the CPU path's concatenate-and-mask (which multiplies every row by every adapter's
factors) with :func:`lorakit.kernels.lora.sgmv_add_`: each row meets only its own adapter's A and B.
"""

from __future__ import annotations

import torch

from .lora import segments, sgmv_add_


def _stacks(layer, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, r_max, in), (L, out, r_max) zero-padded factors and (L,) fp32 scalings, cached per adapter set.

    Rebuilt only when a factor changes in place (its version counter moves), like the CPU path's cache.
    """
    adapters = [layer.adapters[n] for n in names]
    key = tuple((n, id(ad), ad.lora_a._version, ad.lora_b._version, ad.lora_a.data_ptr(), ad.lora_b.data_ptr(),
                 ad.scaling) for n, ad in zip(names, adapters))
    cached = layer.__dict__.get("_sgmv_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    r_max = max(ad.rank for ad in adapters)
    a0 = adapters[0].lora_a
    n_in, n_out = a0.shape[1], adapters[0].lora_b.shape[0]
    a_stack = torch.zeros(len(adapters), r_max, n_in, dtype=a0.dtype, device=a0.device)
    b_stack = torch.zeros(len(adapters), n_out, r_max, dtype=a0.dtype, device=a0.device)
    with torch.no_grad():
        for i, ad in enumerate(adapters):
            a_stack[i, : ad.rank] = ad.lora_a
            b_stack[i, :, : ad.rank] = ad.lora_b
    scales = torch.tensor([float(ad.scaling) for ad in adapters], dtype=torch.float32, device=a0.device)
    stacks = (a_stack, b_stack, scales)
    layer.__dict__["_sgmv_cache"] = (key, stacks)  # not a buffer: never saved, moved or counted
    return stacks


def sgmv_mixed_forward(layer, x: torch.Tensor, result: torch.Tensor, routing) -> torch.Tensor | None:
    """``result`` plus each row's own adapter, or None when this case needs the general path
    (variants with custom math, factors that are not plain 2-D Linear ones, dtype mismatches)."""
    present = [(g, n) for g, n in enumerate(routing.names) if n in layer.adapters]
    if not present:
        return result
    adapters = [layer.adapters[n] for _, n in present]
    if any(ad.custom_math or ad.lora_a.dim() != 2 for ad in adapters):
        return None
    dtype = adapters[0].lora_a.dtype
    if any(ad.lora_a.dtype != dtype for ad in adapters) or result.dtype != dtype:
        return None
    n_rows = routing.row_index.numel()
    if x.shape[0] != n_rows:
        raise ValueError(
            f"adapter_names has {n_rows} entries but this layer sees a batch of {x.shape[0]} rows; "
            "pass one adapter name per row of the input batch"
        )
    tokens = x[0].numel() // x.shape[-1] if x.dim() > 1 else 1  # tokens per batch row
    segs = _segments(routing, tuple(g for g, _ in present), tokens, x.device)
    a_stack, b_stack, scales = _stacks(layer, [n for _, n in present])
    x2 = x.to(dtype).reshape(-1, x.shape[-1])
    out = result.contiguous()  # the base output is fresh: add into it in place (a copy only if strided)
    sgmv_add_(out.view(-1, out.shape[-1]), x2, a_stack, b_stack, scales, segs=segs)
    return out


def _segments(routing, groups: tuple[int, ...], tokens: int, device: torch.device):
    """Rows sorted into per-adapter segments, once per forward pass: every layer with the same adapter
    set and token count shares them (RowRouting lives for one forward), so the sort and its device
    sync happen once, not once per layer."""
    cache = routing.__dict__.setdefault("_sgmv_segments", {})
    key = (groups, tokens, str(device))
    if key not in cache:
        slot_of_group = torch.full((len(routing.names),), -1, dtype=torch.int32)
        for slot, g in enumerate(groups):
            slot_of_group[g] = slot
        row_slot = torch.where(routing.row_index >= 0, slot_of_group[routing.row_index.clamp(min=0)], -1)
        row_slot = row_slot.to(torch.int32).repeat_interleave(tokens).to(device)  # (T,)
        cache[key] = segments(row_slot)
    return cache[key]
