"""LoRA factor arithmetic on tensors only (no modules, no files): spectra, similarity, re-factoring, merging.

A layer's update is ΔW = s·B·A with A: (r, k), B: (d, r). Everything that can be done from the thin
factors is: the SVD of ΔW comes from QR of B and Aᵀ plus an SVD of an r×r core, never the d×k matrix.
Work happens in float64; results come back in float64 (cast them to the adapter's dtype).
Refactoring returns *balanced* factors: B = U·√(Σ/s_out), A = √(Σ/s_out)·Vᵀ, so s_out·B·A = UΣVᵀ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class LoraFactors(NamedTuple):
    """ΔW = scaling · lora_b @ lora_a."""

    lora_a: torch.Tensor  # (r, k)
    lora_b: torch.Tensor  # (d, r)
    scaling: float


class ThinSVD(NamedTuple):
    """ΔW = u · diag(s) · vh, singular values descending."""

    u: torch.Tensor  # (d, m)
    s: torch.Tensor  # (m,)
    vh: torch.Tensor  # (m, k)


class Refactored(NamedTuple):
    """New factors with out_scaling·B·A ≈ target, and ‖target − out_scaling·B·A‖_F / ‖target‖_F."""

    lora_a: torch.Tensor  # (rank, k)
    lora_b: torch.Tensor  # (d, rank)
    relative_error: float


def delta_weight(f: LoraFactors) -> torch.Tensor:
    """Dense ΔW = s·B·A, (d, k) in float64. For references and dense merges only."""
    return f.scaling * (f.lora_b.double() @ f.lora_a.double())


def thin_svd(f: LoraFactors) -> ThinSVD:
    """SVD of s·B·A without forming it: B = Q_b R_b, Aᵀ = Q_a R_a, s·R_b R_aᵀ = U Σ Vᵀ → (Q_b U) Σ (Q_a V)ᵀ."""
    a, b = f.lora_a.double(), f.lora_b.double()
    q_b, r_b = torch.linalg.qr(b)  # (d, p), (p, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (k, q), (q, r)
    core = f.scaling * (r_b @ r_a.T)  # (p, q), p, q ≤ r
    u, s, vh = torch.linalg.svd(core, full_matrices=False)  # (p, m), (m,), (m, q)
    return ThinSVD(q_b @ u, s, vh @ q_a.T)


def singular_values(f: LoraFactors) -> torch.Tensor:
    """The min(r, d, k) singular values of ΔW, descending (the rest are zero)."""
    a, b = f.lora_a.double(), f.lora_b.double()
    r_b = torch.linalg.qr(b, mode="r")[1]  # (p, r)
    r_a = torch.linalg.qr(a.T, mode="r")[1]  # (q, r)
    return torch.linalg.svdvals(abs(f.scaling) * (r_b @ r_a.T))


def frobenius_inner(f1: LoraFactors, f2: LoraFactors) -> float:
    """⟨ΔW1, ΔW2⟩_F = s1·s2·trace((B1ᵀB2)(A2A1ᵀ)) — r1×r2 products only."""
    a1, b1, a2, b2 = (t.double() for t in (f1.lora_a, f1.lora_b, f2.lora_a, f2.lora_b))
    if a1.shape[1] != a2.shape[1] or b1.shape[0] != b2.shape[0]:
        raise ValueError(f"ΔW shapes differ: {(b1.shape[0], a1.shape[1])} vs {(b2.shape[0], a2.shape[1])}")
    gram_b = b1.T @ b2  # (r1, r2)
    gram_a = a2 @ a1.T  # (r2, r1)
    return float(f1.scaling * f2.scaling * torch.einsum("ij,ji->", gram_b, gram_a))


def frobenius_norm(f: LoraFactors) -> float:
    """‖ΔW‖_F = ‖σ‖₂."""
    return float(singular_values(f).norm())


def cosine_similarity(f1: LoraFactors, f2: LoraFactors) -> float:
    """⟨ΔW1, ΔW2⟩ / (‖ΔW1‖‖ΔW2‖); nan when either is zero."""
    denom = frobenius_norm(f1) * frobenius_norm(f2)
    return frobenius_inner(f1, f2) / denom if denom > 0 else float("nan")


def effective_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ energy·Σ σ_i² (0 for ΔW = 0); s sorted descending."""
    power = s.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(power, 0) / total
    # a hair of slack so energy=1.0 doesn't fail on rounding in the last digit
    index = int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64)))
    return min(index + 1, s.shape[0])


def truncation_error(s: torch.Tensor, rank: int) -> float:
    """‖ΔW − ΔW_rank‖_F / ‖ΔW‖_F = √(Σ_{i>rank} σ_i²) / √(Σ σ_i²)  (Eckart–Young)."""
    total = float((s.double() ** 2).sum())
    return float((s[rank:].double() ** 2).sum() / total) ** 0.5 if total > 0 else 0.0


def balanced_factors(svd: ThinSVD, rank: int, out_scaling: float) -> Refactored:
    """Rank-`rank` factors with out_scaling·B·A = U_r Σ_r V_rᵀ, the σ split evenly between B and A."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if out_scaling <= 0:
        raise ValueError(f"out_scaling must be positive, got {out_scaling}")
    m = svd.s.shape[0]
    u, s, vh = svd.u[:, :rank], svd.s[:rank], svd.vh[:rank]  # (d, ≤rank), (≤rank,), (≤rank, k)
    if m < rank:  # pad with zero directions so the factors have exactly `rank` rows/columns
        u = torch.cat([u, u.new_zeros(u.shape[0], rank - m)], 1)
        s = torch.cat([s, s.new_zeros(rank - m)])
        vh = torch.cat([vh, vh.new_zeros(rank - m, vh.shape[1])], 0)
    root = (s / out_scaling).sqrt()  # (rank,)
    return Refactored(root[:, None] * vh, u * root, truncation_error(svd.s, rank))


def truncate(f: LoraFactors, rank: int, out_scaling: float) -> Refactored:
    """Best rank-`rank` approximation of ΔW (truncated SVD), as factors for out_scaling."""
    return balanced_factors(thin_svd(f), rank, out_scaling)


def stack(factors: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """Σ w_i·ΔW_i as one factor pair: A = [A_1; A_2; …] (Σr, k), B = [w_1 s_1 B_1, …] (d, Σr), s = 1."""
    if len(factors) != len(weights) or not factors:
        raise ValueError(f"need one weight per adapter: {len(factors)} adapters, {len(weights)} weights")
    lora_a = torch.cat([f.lora_a.double() for f in factors], 0)  # (Σr, k)
    lora_b = torch.cat([w * f.scaling * f.lora_b.double() for f, w in zip(factors, weights)], 1)  # (d, Σr)
    return LoraFactors(lora_a, lora_b, 1.0)


def concat(factors: Sequence[LoraFactors], weights: Sequence[float], out_scaling: float) -> Refactored:
    """Exact Σ w_i ΔW_i with rank Σ r_i: weights and scalings folded into B (divided by out_scaling)."""
    f = stack(factors, weights)
    return Refactored(f.lora_a, f.lora_b / out_scaling, 0.0)


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], eps: float) -> int:
    """Count of σ_i > σ_max·max(d, k)·eps (numpy's matrix_rank rule at the inputs' precision)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > s[0] * max(shape) * eps).sum())


def weighted_sum(factors: Sequence[LoraFactors], weights: Sequence[float], out_scaling: float,
                 rank: int | None = None, eps: float = torch.finfo(torch.float32).eps) -> Refactored:
    """Σ w_i ΔW_i re-factored by SVD of the stacked factors (no d×k matrix).

    rank=None keeps the sum's numerical rank (lossless; ≤ Σ r_i, = r when the adapters share
    subspaces); an int truncates to the best rank-`rank` approximation.
    """
    svd = thin_svd(stack(factors, weights))
    shape = (factors[0].lora_b.shape[0], factors[0].lora_a.shape[1])
    if rank is None:
        rank = max(1, numerical_rank(svd.s, shape, eps))
    return balanced_factors(svd, rank, out_scaling)


def factorize(delta: torch.Tensor, rank: int, out_scaling: float) -> Refactored:
    """Best rank-`rank` factors of a dense (d, k) matrix."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (d, m), (m,), (m, k)
    return balanced_factors(ThinSVD(u, s, vh), rank, out_scaling)


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·numel) entries of largest |value|, zero the rest."""
    _check_density(density)
    keep = int(density * delta.numel())
    flat = delta.reshape(-1)
    out = torch.zeros_like(flat)
    if keep > 0:
        idx = flat.abs().topk(keep).indices
        out[idx] = flat[idx]
    return out.view_as(delta)


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023) of dense task vectors τ_i = w_i·ΔW_i.

    trim: τ̂_i = top-density fraction of τ_i by magnitude; elect: γ = sign(Σ_i τ̂_i);
    disjoint mean: ΔW[j] = mean of τ̂_i[j] over i with sign(τ̂_i[j]) = γ[j] (0 where none).
    """
    if len(deltas) != len(weights):
        raise ValueError(f"need one weight per adapter: {len(deltas)} adapters, {len(weights)} weights")
    trimmed = torch.stack([magnitude_trim(w * d.double(), density) for d, w in zip(deltas, weights)])  # (n, d, k)
    sign = torch.sign(trimmed.sum(0))  # (d, k)
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)  # (n, d, k)
    count = agree.sum(0).clamp(min=1)  # (d, k)
    return (trimmed * agree).sum(0) / count


def dare_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
               generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each entry with prob 1−p, rescale survivors by 1/p, then Σ w_i·ΔW̃_i.

    Masks are drawn in adapter order as torch.rand(d, k, generator) < p, so a seeded generator
    reproduces them.
    """
    if len(deltas) != len(weights):
        raise ValueError(f"need one weight per adapter: {len(deltas)} adapters, {len(weights)} weights")
    _check_density(density)
    out = torch.zeros_like(deltas[0], dtype=torch.float64)
    for d, w in zip(deltas, weights):
        keep = torch.rand(d.shape, generator=generator) < density  # (d, k) bool
        out += w * d.double() * keep / density
    return out


def linear_peft(factors: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """PEFT's "linear" combination, scaling 1: with cᵢ = wᵢ·sᵢ,
    A = Σ sign(cᵢ)·√|cᵢ|·Aᵢ and B = Σ √|cᵢ|·Bᵢ (PEFT 0.21's _generalized_task_arithmetic).

    Needs equal ranks, and is not Σ wᵢ·ΔWᵢ in general (cross terms); kept for PEFT users who
    rely on it. `weighted_sum` is the exact alternative.
    """
    ranks = {f.lora_a.shape[0] for f in factors}
    if len(ranks) != 1:
        raise ValueError(f"the 'linear' combination needs equal ranks, got {sorted(ranks)}; use 'cat' or 'svd'")
    coefs = [w * f.scaling for f, w in zip(factors, weights)]
    lora_a = sum((1.0 if c >= 0 else -1.0) * abs(c) ** 0.5 * f.lora_a.double() for f, c in zip(factors, coefs))
    lora_b = sum(abs(c) ** 0.5 * f.lora_b.double() for f, c in zip(factors, coefs))
    return LoraFactors(lora_a, lora_b, 1.0)
