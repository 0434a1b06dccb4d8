"""The fixed code books: NF4, FP4 (16 values each) and the signed dynamic 8-bit map.

NF4 holds the 16 quantiles of N(0, 1), normalised to [-1, 1] with an exact zero (QLoRA, Dettmers
et al. 2023). The float32 values below are the ones bitsandbytes 0.50 uses, so packed codes are
interchangeable. FP4 is a 1-sign / 2-exponent / 1-mantissa float (bias 2), listed in bit-pattern
order and divided by its largest magnitude. The dynamic map (Dettmers 2015) is the 8-bit code
the per-block absmax values are quantised with under double quantisation.
"""

from __future__ import annotations

import functools

import torch

QUANT_TYPES = ("nf4", "fp4")

# code[i] for 4-bit pattern i; sorted ascending, code[7] == 0 exactly.
_NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 magnitudes for the 3 low bits (000 → 0, 001 → subnormal 0.0625, 010 → 8, ...); bit 3 = sign.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


@functools.cache
def _code(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        raw = torch.tensor(_FP4_MAGNITUDES + tuple(-m for m in _FP4_MAGNITUDES), dtype=torch.float32)
        return raw / 12.0  # normalise so the largest magnitude is 1; 0 stays +0
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def get_code(quant_type: str) -> torch.Tensor:
    """The 16-entry float32 code book of ``quant_type`` ("nf4" or "fp4"); a fresh copy."""
    return _code(quant_type).clone()


@functools.cache
def _dynamic_map() -> torch.Tensor:
    # Signed dynamic map with 7 exponent bits in 8: for decade e = 0..6 the 2**e midpoints of an
    # even split of [0.1, 1] are scaled by 10**(e - 6) and taken with both signs (2 * 127 values),
    # plus 0 and 1: 256 sorted values in [-0.993, 1]. Same float32 steps as bitsandbytes.
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0  # (2**e,)
        scaled = mids * 10.0 ** (e - 6)
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """The 256-entry signed dynamic 8-bit code (float32, sorted) used for double quantisation."""
    return _dynamic_map().clone()


@functools.cache
def pair_table(quant_type: str) -> torch.Tensor:
    """(256, 2) float32: byte b → (code[b >> 4], code[b & 15]), the dequantisation lookup."""
    code = _code(quant_type)
    hi = code.repeat_interleave(16)  # (256,) code of the high nibble
    lo = code.repeat(16)  # (256,) code of the low nibble
    return torch.stack([hi, lo], dim=1).contiguous()
