"""inspect / compare against torch.linalg on the dense ΔW that PEFT computes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from analysis_helpers import adapters_fixture, base_checkpoint_fixture, one_thread  # noqa: F401  (fixtures)
from safetensors.torch import load_file

from lorakit.analysis.errors import IncompatibleAdaptersError
from lorakit.analysis.inspect import compare_adapters, inspect_adapter
from lorakit.analysis.plot import plot_stats


@pytest.mark.parametrize("which", ["a", "b", "mixed"])
def test_spectra_and_norms_match_dense_svd(adapters, which):
    written = adapters[which]
    stats = inspect_adapter(written.path)
    assert [lay.name for lay in stats.layers] == sorted(written.dense)
    for lay in stats.layers:
        dense = written.dense[lay.name]
        reference = torch.linalg.svdvals(dense)
        m = len(lay.singular_values)
        assert m == min(lay.rank, *dense.shape)
        torch.testing.assert_close(torch.tensor(lay.singular_values, dtype=torch.float64), reference[:m],
                                   rtol=1e-5, atol=1e-6)
        assert lay.norm == pytest.approx(torch.linalg.matrix_norm(dense).item(), rel=1e-5)
        energy = torch.cumsum(reference**2, 0) / (reference**2).sum()
        assert lay.effective_rank_90 == int((energy < 0.90).sum()) + 1
        assert lay.effective_rank_99 == int((energy < 0.99).sum()) + 1
        assert lay.shape == tuple(dense.shape)
    total = math.sqrt(sum(d.norm().item() ** 2 for d in written.dense.values()))
    assert stats.summary["total_norm"] == pytest.approx(total, rel=1e-5)
    assert stats.summary["num_layers"] == len(written.dense)
    assert stats.num_params == sum(lay.rank * sum(lay.shape) for lay in stats.layers)


def test_relative_norm_uses_base_weights(adapters, base_checkpoint):
    stats = inspect_adapter(adapters["a"].path, base=base_checkpoint)
    weights = load_file(base_checkpoint / "model.safetensors")
    for lay in stats.layers:
        w0 = weights[f"{lay.name}.weight"].double().norm().item()
        assert lay.base_norm == pytest.approx(w0, rel=1e-12)
        assert lay.relative_norm == pytest.approx(lay.norm / w0, rel=1e-12)
    assert stats.summary["max_relative_norm"] == max(lay.relative_norm for lay in stats.layers)


def test_json_is_standard_and_complete(adapters):
    data = json.loads(json.dumps(inspect_adapter(adapters["qv"].path).to_dict(), allow_nan=False))
    assert data["r"] == 4 and len(data["layers"]) == 4
    assert set(data["layers"][0]) >= {"name", "shape", "rank", "scaling", "norm", "singular_values",
                                      "effective_rank_90", "effective_rank_99", "relative_norm"}


def test_compare_cosines_match_dense(adapters):
    a, b = adapters["a"], adapters["b"]
    comparison = compare_adapters(a.path, b.path)
    assert not comparison.only_in_a and not comparison.only_in_b
    inner = na = nb = 0.0
    for row in comparison.layers:
        d1, d2 = a.dense[row.name], b.dense[row.name]
        assert row.cosine == pytest.approx(((d1 * d2).sum() / (d1.norm() * d2.norm())).item(), rel=1e-4, abs=1e-7)
        inner, na, nb = inner + (d1 * d2).sum().item(), na + d1.norm().item() ** 2, nb + d2.norm().item() ** 2
    assert comparison.overall_cosine == pytest.approx(inner / math.sqrt(na * nb), rel=1e-4, abs=1e-7)
    assert compare_adapters(a.path, a.path).mean_cosine == pytest.approx(1.0, rel=1e-6)


def test_compare_lists_layers_only_one_side_has(adapters):
    comparison = compare_adapters(adapters["a"].path, adapters["qv"].path)
    assert len(comparison.layers) == 4 and len(comparison.only_in_a) == 10 and comparison.only_in_b == []
    with pytest.raises(IncompatibleAdaptersError, match="no common layer"):
        compare_adapters(adapters["a"].path, adapters["mixed"].path)


def test_base_that_is_not_a_checkpoint(adapters, tmp_path):
    from lorakit.analysis.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        inspect_adapter(adapters["qv"].path, base=tmp_path)


def test_plot_writes_a_png(adapters, base_checkpoint, tmp_path):
    out = plot_stats(inspect_adapter(adapters["a"].path, base=base_checkpoint), tmp_path / "plots" / "a.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
