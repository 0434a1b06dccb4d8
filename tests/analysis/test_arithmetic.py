"""Factor arithmetic against the dense d×k matrices, computed plainly."""

from __future__ import annotations

import pytest
import torch
from analysis_helpers import one_thread  # noqa: F401  (fixture)

from lorakit.core import arithmetic as ar


def factors(d: int, k: int, r: int, scaling: float, seed: int) -> ar.LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return ar.LoraFactors(torch.randn(r, k, generator=g), torch.randn(d, r, generator=g), scaling)


def dense(f: ar.LoraFactors) -> torch.Tensor:
    return f.scaling * f.lora_b.double() @ f.lora_a.double()


@pytest.mark.parametrize("d,k,r", [(48, 32, 8), (8, 40, 12), (40, 6, 12), (16, 16, 16)])
def test_singular_values_and_svd_match_dense(d, k, r):
    f = factors(d, k, r, 1.5, seed=d + k + r)
    reference = torch.linalg.svdvals(dense(f))  # (min(d, k),)
    s = ar.singular_values(f)
    m = s.shape[0]
    assert m == min(d, k, r)
    torch.testing.assert_close(s, reference[:m], rtol=1e-10, atol=1e-10)
    assert reference[m:].abs().max().item() < 1e-10 if reference.shape[0] > m else True
    u, s2, vh = ar.thin_svd(f)
    torch.testing.assert_close(u @ torch.diag(s2) @ vh, dense(f), rtol=1e-10, atol=1e-10)
    assert ar.frobenius_norm(f) == pytest.approx(torch.linalg.matrix_norm(dense(f)).item(), rel=1e-12)


def test_inner_product_and_cosine_match_dense():
    f1, f2 = factors(30, 20, 4, 2.0, 1), factors(30, 20, 7, 0.5, 2)
    d1, d2 = dense(f1), dense(f2)
    assert ar.frobenius_inner(f1, f2) == pytest.approx((d1 * d2).sum().item(), rel=1e-12)
    cos = (d1 * d2).sum() / (d1.norm() * d2.norm())
    assert ar.cosine_similarity(f1, f2) == pytest.approx(cos.item(), rel=1e-10)
    assert ar.cosine_similarity(f1, f1) == pytest.approx(1.0, rel=1e-12)
    neg = ar.LoraFactors(f1.lora_a, f1.lora_b, -f1.scaling)
    assert ar.cosine_similarity(f1, neg) == pytest.approx(-1.0, rel=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        ar.frobenius_inner(f1, factors(31, 20, 4, 1.0, 3))


def test_effective_rank_counts_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert ar.effective_rank(s, 9 / 14) == 1
    assert ar.effective_rank(s, 0.90) == 2  # 13/14 = 0.929
    assert ar.effective_rank(s, 0.99) == 3
    assert ar.effective_rank(s, 1.0) == 3
    assert ar.effective_rank(torch.zeros(3), 0.9) == 0


def test_truncate_is_eckart_young_with_balanced_factors():
    f = factors(40, 30, 10, 0.7, 4)
    u, s, vh = torch.linalg.svd(dense(f), full_matrices=False)
    for rank in (1, 4, 10):
        out = ar.truncate(f, rank, out_scaling=0.25)
        assert out.lora_a.shape == (rank, 30) and out.lora_b.shape == (40, rank)
        reference = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        torch.testing.assert_close(0.25 * out.lora_b @ out.lora_a, reference, rtol=1e-10, atol=1e-10)
        closed = ((s[rank:] ** 2).sum() / (s**2).sum()).sqrt().item()
        assert out.relative_error == pytest.approx(closed, abs=1e-12)
        measured = (dense(f) - reference).norm() / dense(f).norm()
        assert out.relative_error == pytest.approx(measured.item(), rel=1e-8, abs=1e-12)
        # balanced: B and A carry the same column/row norms √(σ/s)
        torch.testing.assert_close(out.lora_b.norm(dim=0), out.lora_a.norm(dim=1), rtol=1e-10, atol=1e-12)


def test_truncate_pads_when_rank_exceeds_the_matrix():
    f = factors(3, 20, 2, 1.0, 5)
    out = ar.truncate(f, 5, 1.0)
    assert out.lora_a.shape == (5, 20) and out.lora_b.shape == (3, 5)
    torch.testing.assert_close(out.lora_b @ out.lora_a, dense(f), rtol=1e-10, atol=1e-10)


def test_concat_and_weighted_sum_equal_the_dense_sum():
    fs = [factors(24, 16, 4, 2.0, 6), factors(24, 16, 6, 0.5, 7)]
    w = [0.7, -1.3]
    reference = w[0] * dense(fs[0]) + w[1] * dense(fs[1])
    cat = ar.concat(fs, w, out_scaling=3.0)
    assert cat.lora_a.shape == (10, 16)
    torch.testing.assert_close(3.0 * cat.lora_b @ cat.lora_a, reference, rtol=1e-12, atol=1e-12)
    lin = ar.weighted_sum(fs, w, out_scaling=3.0)  # numerical rank: 10 here
    assert lin.lora_a.shape[0] == 10 and lin.relative_error < 1e-12
    torch.testing.assert_close(3.0 * lin.lora_b @ lin.lora_a, reference, rtol=1e-10, atol=1e-10)
    # same subspace (shared A): the sum keeps rank 4
    shared = ar.LoraFactors(fs[0].lora_a, fs[0].lora_b * 2 + 1, 1.0)
    assert ar.weighted_sum([fs[0], shared], [1.0, 1.0], 1.0).lora_a.shape[0] == 4


def plain_ties(deltas, weights, density):
    """TIES written out entry by entry as the paper states it."""
    taus = [w * d for d, w in zip(deltas, weights)]
    trimmed = []
    for t in taus:
        keep = int(density * t.numel())
        threshold = t.abs().flatten().sort(descending=True).values[keep - 1]
        trimmed.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
    out = torch.zeros_like(taus[0])
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            values = [t[i, j].item() for t in trimmed]
            total = sum(values)
            sign = (total > 0) - (total < 0)
            agreeing = [v for v in values if v != 0 and ((v > 0) - (v < 0)) == sign]
            out[i, j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out


def test_ties_matches_the_paper_entry_by_entry():
    g = torch.Generator().manual_seed(8)
    deltas = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    torch.testing.assert_close(ar.ties_merge(deltas, weights, 0.4), plain_ties(deltas, weights, 0.4))
    # density 1 and a single adapter: nothing trimmed, the mean of one is itself
    torch.testing.assert_close(ar.ties_merge(deltas[:1], [2.0], 1.0), 2.0 * deltas[0])


def test_dare_matches_masks_drawn_from_the_same_seed():
    g = torch.Generator().manual_seed(9)
    deltas = [torch.randn(7, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    out = ar.dare_merge(deltas, [0.3, 0.9], 0.5, torch.Generator().manual_seed(11))
    replay = torch.Generator().manual_seed(11)
    reference = torch.zeros(7, 4, dtype=torch.float64)
    for d, w in zip(deltas, [0.3, 0.9]):
        keep = torch.rand(7, 4, generator=replay) < 0.5
        reference += w * torch.where(keep, d / 0.5, torch.zeros_like(d))
    torch.testing.assert_close(out, reference)
    # p = 1 drops nothing: plain weighted sum
    full = ar.dare_merge(deltas, [0.3, 0.9], 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(full, 0.3 * deltas[0] + 0.9 * deltas[1])
    with pytest.raises(ValueError, match="density"):
        ar.dare_merge(deltas, [1.0, 1.0], 0.0, torch.Generator())
