"""combine: every method against a dense reference computed plainly here, through PEFT's loader."""

from __future__ import annotations

import json

import pytest
import torch
from analysis_helpers import Mixed, adapters_fixture, loaded_dense, one_thread, tiny_llama  # noqa: F401  (fixtures)

from lorakit.analysis.combine import combine
from lorakit.analysis.errors import IncompatibleAdaptersError, RankError
from lorakit.core import arithmetic as ar

WEIGHTS = [0.7, -0.4, 1.2]


def truncated(dense: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def weighted(adapters, name: str) -> torch.Tensor:
    return sum(w * adapters[x].dense[name] for x, w in zip("abc", WEIGHTS))


def run(adapters, tmp_path, method, **kw):
    report = combine([adapters[x].path for x in "abc"], tmp_path / method, WEIGHTS, method, **kw)
    return report, loaded_dense(tmp_path / method, tiny_llama())


def test_concat_is_exact_and_ranks_add_up(adapters, tmp_path):
    report, loaded = run(adapters, tmp_path, "concat")
    for row in report.layers:
        torch.testing.assert_close(loaded[row.name], weighted(adapters, row.name), rtol=1e-5, atol=1e-6)
        expected_rank = (4 if row.name.endswith("q_proj") else 8) + 4 + 6
        assert row.rank == expected_rank and row.relative_error == 0.0


def test_linear_is_the_exact_sum_at_its_numerical_rank(adapters, tmp_path):
    report, loaded = run(adapters, tmp_path, "linear")
    for row in report.layers:
        reference = weighted(adapters, row.name)
        torch.testing.assert_close(loaded[row.name], reference, rtol=1e-5, atol=1e-6)
        assert row.rank == torch.linalg.matrix_rank(reference.float()).item()  # at fp32 precision
    # one adapter twice: the sum stays in its subspace, so its rank stays 4
    twice = combine([adapters["qv"].path] * 2, tmp_path / "twice", [0.25, 0.5], "linear")
    assert {row.rank for row in twice.layers} == {4}
    config = json.loads((tmp_path / "twice" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]


def test_svd_is_the_truncated_weighted_sum(adapters, tmp_path):
    report, loaded = run(adapters, tmp_path, "svd", rank=5)
    for row in report.layers:
        reference = weighted(adapters, row.name)
        torch.testing.assert_close(loaded[row.name], truncated(reference, 5), rtol=1e-5, atol=1e-6)
        measured = ((loaded[row.name] - reference).norm() / reference.norm()).item()
        assert row.relative_error == pytest.approx(measured, rel=1e-3)


def test_ties_matches_dense_reference(adapters, tmp_path):
    report, loaded = run(adapters, tmp_path, "ties", rank=6, density=0.3)
    for row in report.layers:
        taus = [w * adapters[x].dense[row.name] for x, w in zip("abc", WEIGHTS)]
        trimmed = []
        for t in taus:  # keep the top 30% by magnitude
            keep = int(0.3 * t.numel())
            threshold = t.abs().flatten().sort(descending=True).values[keep - 1]
            trimmed.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
        stacked = torch.stack(trimmed)
        sign = torch.sign(stacked.sum(0))
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(loaded[row.name], truncated(merged, 6), rtol=1e-5, atol=1e-6)


def test_dare_matches_dense_reference_and_is_seeded(adapters, tmp_path):
    report, loaded = run(adapters, tmp_path, "dare", rank=6, density=0.6, seed=3)
    generator = torch.Generator().manual_seed(3)  # one stream, layers in sorted order
    for row in report.layers:
        merged = torch.zeros_like(adapters["a"].dense[row.name])
        for x, w in zip("abc", WEIGHTS):
            delta = adapters[x].dense[row.name]
            keep = torch.rand(delta.shape, generator=generator) < 0.6
            merged += w * torch.where(keep, delta / 0.6, torch.zeros_like(delta))
        torch.testing.assert_close(loaded[row.name], truncated(merged, 6), rtol=1e-5, atol=1e-6)
    again = combine([adapters[x].path for x in "abc"], tmp_path / "again", WEIGHTS, "dare", rank=6, density=0.6,
                    seed=3)
    assert again.layers == report.layers


def test_mixed_layer_kinds_concat(adapters, tmp_path):
    path = adapters["mixed"].path
    combine([path, path], tmp_path / "m", [2.0, -0.5], "concat")
    loaded = loaded_dense(tmp_path / "m", Mixed())
    for name, dense in adapters["mixed"].dense.items():
        torch.testing.assert_close(loaded[name], 1.5 * dense, rtol=1e-5, atol=1e-6)


def test_incompatible_adapters_name_the_layer(adapters, tmp_path):
    with pytest.raises(IncompatibleAdaptersError, match=r"layer model\.layers\.0\.mlp\.down_proj is adapted by"):
        combine([adapters["a"].path, adapters["qv"].path], tmp_path / "x", [1, 1], "concat")
    wide = tmp_path / "wide"
    written = adapters["qv"]
    adapter_config = json.loads((written.path / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = load_file(written.path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(48, 4)
    wide.mkdir()
    save_file(tensors, wide / "adapter_model.safetensors")
    (wide / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(IncompatibleAdaptersError, match=r"layer model\.layers\.1\.self_attn\.v_proj: ΔW is linear"):
        combine([written.path, wide], tmp_path / "y", [1, 1], "linear")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_bad_options(adapters, tmp_path):
    paths = [adapters["qv"].path] * 2
    with pytest.raises(ValueError, match="one number per adapter"):
        combine(paths, tmp_path / "o", [1.0], "linear")
    with pytest.raises(ValueError, match="needs --density"):
        combine(paths, tmp_path / "o", [1, 1], "ties")
    with pytest.raises(ValueError, match="does not apply to concat"):
        combine(paths, tmp_path / "o", [1, 1], "concat", rank=2)
    with pytest.raises(RankError, match="at most 8"):
        combine(paths, tmp_path / "o", [1, 1], "svd", rank=9)
    with pytest.raises(ValueError, match="method must be one of"):
        combine(paths, tmp_path / "o", [1, 1], "mean")


def test_default_weights_average(adapters, tmp_path):
    report = combine([adapters["qv"].path, adapters["qv"].path], tmp_path / "avg", method="concat")
    assert report.weights == [0.5, 0.5]
    loaded = loaded_dense(tmp_path / "avg", tiny_llama())
    for name, dense in adapters["qv"].dense.items():
        torch.testing.assert_close(loaded[name], dense, rtol=1e-5, atol=1e-6)


def test_pure_helpers_used_by_the_core_agree_with_files(adapters):
    """arithmetic.weighted_sum on factor tuples gives the same ΔW as the file-level linear combine."""
    from lorakit.analysis.factors import read_adapter

    layers = [read_adapter(adapters[x].path).targets["model.layers.0.self_attn.o_proj"] for x in "abc"]
    out = ar.weighted_sum([lay.factors for lay in layers], WEIGHTS, out_scaling=2.0)
    torch.testing.assert_close(2.0 * out.lora_b @ out.lora_a, weighted(adapters, "model.layers.0.self_attn.o_proj"),
                               rtol=1e-5, atol=1e-6)
