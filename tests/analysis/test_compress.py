"""compress: what PEFT loads from the output equals the dense truncated SVD."""

from __future__ import annotations

import json

import pytest
import torch
from analysis_helpers import Mixed, adapters_fixture, loaded_dense, one_thread, tiny_llama  # noqa: F401  (fixtures)

from lorakit.analysis.compress import compress
from lorakit.analysis.errors import NotAnAdapterError, RankError


def truncated(dense: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


@pytest.mark.parametrize("which,base,k", [("a", tiny_llama, 3), ("mixed", Mixed, 2)])
def test_rank_k_equals_dense_truncated_svd(adapters, tmp_path, which, base, k):
    written = adapters[which]
    report = compress(written.path, tmp_path / "out", rank=k)
    loaded = loaded_dense(tmp_path / "out", base())
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == k and config["rank_pattern"] == {}
    for row in report.layers:
        dense = written.dense[row.name]
        torch.testing.assert_close(loaded[row.name], truncated(dense, k), rtol=1e-5, atol=1e-6)
        s = torch.linalg.svdvals(dense)
        closed = ((s[k:] ** 2).sum().sqrt() / s.norm()).item()
        assert row.relative_error == pytest.approx(closed, rel=1e-4, abs=1e-6)
        measured = ((loaded[row.name] - dense).norm() / dense.norm()).item()
        assert row.relative_error == pytest.approx(measured, rel=1e-3, abs=1e-6)
        assert row.new_rank == k
    assert report.new_params == sum(k * sum(written.dense[r.name].shape) for r in report.layers)


def test_energy_picks_per_layer_ranks(adapters, tmp_path):
    written = adapters["a"]
    report = compress(written.path, tmp_path / "out", energy=0.9)
    loaded = loaded_dense(tmp_path / "out", tiny_llama())
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    for row in report.layers:
        s = torch.linalg.svdvals(written.dense[row.name])
        energy = torch.cumsum(s**2, 0) / (s**2).sum()
        k = int((energy < 0.9).sum()) + 1
        assert row.new_rank == k and row.energy_kept >= 0.9
        assert config["rank_pattern"].get(row.name, config["r"]) == k
        torch.testing.assert_close(loaded[row.name], truncated(written.dense[row.name], k), rtol=1e-5, atol=1e-6)


def test_rank_above_adapter_rank_is_an_error(adapters, tmp_path):
    with pytest.raises(RankError, match=r"--rank 5 is larger than layer .*q_proj's rank 4"):
        compress(adapters["a"].path, tmp_path / "out", rank=5)
    with pytest.raises(RankError, match="at least 1"):
        compress(adapters["a"].path, tmp_path / "out", rank=0)
    with pytest.raises(ValueError, match="exactly one"):
        compress(adapters["a"].path, tmp_path / "out")
    with pytest.raises(NotAnAdapterError):
        compress(tmp_path, tmp_path / "out", rank=1)
    assert not (tmp_path / "out").exists()
