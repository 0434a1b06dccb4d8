"""Adapter arithmetic on factor pairs: ΔW = B·A with any scaling already folded into B.

Pure tensor functions (no modules, no files) shared by ``LoraModel.add_weighted_adapter`` and the
``lorakit combine`` / ``compress`` commands. Factors may be Linear-shaped (A: (r, in), B: (out, r))
or Conv-shaped (A: (r, in, *k), B: (out, r, 1, ...)); the math works on the flattened forms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Factors = tuple[torch.Tensor, torch.Tensor]  # (A, B) with ΔW = B·A (scaling folded in)


def dense(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ΔW = B·A flattened to (out, in·k), fp32."""
    return b.flatten(1).float() @ a.flatten(1).float()


def concat(factors: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """Exact weighted sum Σ wᵢ·Bᵢ·Aᵢ as one adapter of rank Σ rᵢ: A = [A₁; A₂; …], B = [w₁B₁, w₂B₂, …]."""
    a = torch.cat([a for a, _ in factors], dim=0)
    b = torch.cat([w * b for (_, b), w in zip(factors, weights)], dim=1)
    return a, b


def svd_refactor(delta: torch.Tensor, rank: int, a_shape: Sequence[int], b_shape: Sequence[int]) -> Factors:
    """Best rank-k approximation of a dense ΔW (out, in·k), split as B = U·S, A = Vᵀ.

    a_shape / b_shape give the factor layout for rank 1 (e.g. (1, in, 3, 3) and (out, 1, 1, 1)).
    """
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    rank = min(rank, s.numel())
    b = (u[:, :rank] * s[:rank]).reshape(b_shape[0], rank, *b_shape[2:])
    a = vh[:rank].reshape(rank, *a_shape[1:])
    return a, b


def thin_singular_values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Singular values of B·A without forming it: QR of both thin factors, then an r×r SVD."""
    qb, rb = torch.linalg.qr(b.flatten(1).float())  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(a.flatten(1).float().T)  # (in, r), (r, r)
    return torch.linalg.svdvals(rb @ ra.T)


def linear_peft(factors: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """PEFT's "linear" combination: A = Σ √wᵢ·Aᵢ, B = Σ √wᵢ·Bᵢ (equal ranks; not Σ wᵢ·ΔWᵢ in general)."""
    ranks = {a.shape[0] for a, _ in factors}
    if len(ranks) != 1:
        raise ValueError(f"the 'linear' combination needs equal ranks, got {sorted(ranks)}; use 'cat' or 'svd'")
    signs = [1.0 if w >= 0 else -1.0 for w in weights]
    roots = [abs(w) ** 0.5 for w in weights]
    a = sum(r * a for (a, _), r in zip(factors, roots))
    b = sum(s * r * b for (_, b), r, s in zip(factors, roots, signs))
    return a, b
