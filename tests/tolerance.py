"""Float tolerances derived from fp32 rounding at the tensor's scale, never from one machine.

Two fp32 computations of the same math in a different order (merged W + ΔW vs W·x + B·A·x, one
thread vs two, AVX2 vs AVX-512 GEMM kernels) differ by rounding only. A reduction of length K
rounds with an error that grows like √K·eps relative to the values it sums (the random-walk
bound; the worst case K·eps never occurs with independent roundings), and `depth` such reductions
chained through a network add up. So the tolerance is

    atol = depth · √K · eps32 · max|expected|

and a real bug (an adapter applied twice, a wrong scaling, a dropped bias) moves outputs by orders
of magnitude more than that.
"""

from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps


def fp32_atol(expected: torch.Tensor, *, reduction: int, depth: int = 1) -> float:
    """The absolute tolerance above for comparing against `expected`."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    return depth * math.sqrt(reduction) * EPS32 * scale


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, *, reduction: int, depth: int = 1) -> None:
    """Equal up to fp32 rounding of `depth` chained reductions of length `reduction`."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    atol = fp32_atol(expected, reduction=reduction, depth=depth)
    diff = float((actual.detach().float() - expected.detach().float()).abs().max()) if actual.numel() else 0.0
    assert diff <= atol, (
        f"max |diff| {diff:.3g} exceeds the fp32 rounding tolerance {atol:.3g} "
        f"(depth {depth} · √{reduction} · eps · scale {atol / max(depth * math.sqrt(reduction) * EPS32, 1e-30):.3g})"
    )
