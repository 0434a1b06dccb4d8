"""Reading PEFT-written adapters into factors, writing them back so PEFT loads them, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from analysis_helpers import Mixed, adapters_fixture, loaded_dense, one_thread, tiny_llama  # noqa: F401  (fixtures)
from safetensors.torch import load_file, save_file

from lorakit.analysis.errors import CorruptAdapterError, NotAnAdapterError, UnsupportedAdapterError
from lorakit.analysis.factors import read_adapter, write_adapter
from lorakit.core import arithmetic as ar


@pytest.mark.parametrize("which", ["a", "b", "mixed"])
def test_factors_reproduce_peft_delta_weight(adapters, which):
    written = adapters[which]
    adapter = read_adapter(written.path)
    assert sorted(adapter.targets) == sorted(written.dense)
    for name, layer in adapter.targets.items():
        torch.testing.assert_close(ar.delta_weight(layer.factors), written.dense[name], rtol=1e-6, atol=1e-7)


def test_patterns_and_kinds_follow_peft(adapters):
    a = read_adapter(adapters["a"].path).targets
    q, v, down = (a["model.layers.1.self_attn.q_proj"], a["model.layers.1.self_attn.v_proj"],
                  a["model.layers.1.mlp.down_proj"])
    assert (q.rank, q.alpha, q.scaling) == (4, 16, 4.0)  # rank_pattern q_proj: 4
    assert (v.rank, v.scaling) == (8, 2.0)
    assert (down.alpha, down.scaling) == (5, 5 / 8)  # alpha_pattern on layer 1 only
    assert a["model.layers.0.mlp.down_proj"].alpha == 16
    b = read_adapter(adapters["b"].path).targets["model.layers.0.self_attn.k_proj"]
    assert b.scaling == 8 / 2  # rsLoRA: α/√r
    mixed = read_adapter(adapters["mixed"].path).targets
    assert {n: (lay.kind, lay.shape) for n, lay in mixed.items()} == {
        "conv": ("conv", (10, 27)), "emb": ("embedding", (12, 20)), "lin": ("linear", (9, 12))}


@pytest.mark.parametrize("which,base", [("a", tiny_llama), ("mixed", Mixed)])
def test_write_roundtrip_loads_in_peft(adapters, tmp_path, which, base):
    adapter = read_adapter(adapters[which].path)
    out = write_adapter(tmp_path / "copy", adapter.targets, adapter.config, adapter.other, adapter.dtype)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    text = (out / "adapter_config.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    config = json.loads(text)
    if which == "a":  # full module names now, the old short keys gone
        assert config["r"] == 8 and config["lora_alpha"] == 16
        assert config["rank_pattern"] == {f"model.layers.{i}.self_attn.q_proj": 4 for i in (0, 1)}
        assert config["alpha_pattern"] == {"model.layers.1.mlp.down_proj": 5}
    dense = loaded_dense(out, base())
    for name, reference in adapters[which].dense.items():
        torch.testing.assert_close(dense[name], reference, rtol=1e-6, atol=1e-7)


def test_legacy_bin_is_read_without_unpickling(adapters, tmp_path):
    folder = tmp_path / "legacy"
    shutil.copytree(adapters["qv"].path, folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    adapter = read_adapter(folder)
    for name, layer in adapter.targets.items():
        torch.testing.assert_close(ar.delta_weight(layer.factors), adapters["qv"].dense[name], rtol=1e-6, atol=1e-7)


def test_not_an_adapter(tmp_path):
    with pytest.raises(NotAnAdapterError, match="is not a folder"):
        read_adapter(tmp_path / "missing")
    with pytest.raises(NotAnAdapterError, match="has no adapter_config.json"):
        read_adapter(tmp_path)
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "adapter_config.json").write_text("{}")
    with pytest.raises(NotAnAdapterError, match="adapter subfolders: default"):
        read_adapter(tmp_path)


def _copy(adapters, tmp_path, which="qv"):
    folder = tmp_path / "bad"
    shutil.copytree(adapters[which].path, folder)
    return folder


def test_missing_or_corrupt_weights(adapters, tmp_path):
    folder = _copy(adapters, tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptAdapterError, match="truncated or corrupt"):
        read_adapter(folder)
    weights.unlink()
    with pytest.raises(CorruptAdapterError, match="no adapter_model.safetensors"):
        read_adapter(folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(CorruptAdapterError, match="not valid JSON"):
        read_adapter(folder)


def test_inconsistent_tensors(adapters, tmp_path):
    folder = _copy(adapters, tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(CorruptAdapterError, match="layer model.layers.0.self_attn.q_proj has no lora_B"):
        read_adapter(folder)
    tensors[key] = torch.zeros(tensors[key].shape[0], 3)
    save_file(tensors, weights)
    with pytest.raises(CorruptAdapterError, match="don't multiply"):
        read_adapter(folder)
    save_file(load_file(adapters["qv"].path / "adapter_model.safetensors"), weights)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 6}))
    with pytest.raises(CorruptAdapterError, match="stores rank 4 but adapter_config.json gives it r=6"):
        read_adapter(folder)
    save_file({"base_model.model.classifier.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(NotAnAdapterError, match="holds no LoRA tensors"):
        read_adapter(folder)


def test_unsupported_flavours(adapters, tmp_path):
    folder = _copy(adapters, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        read_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "ADALORA"}))
    with pytest.raises(UnsupportedAdapterError, match="ADALORA"):
        read_adapter(folder)


def test_reads_adapters_written_by_lorakit(tmp_path):
    from analysis_helpers import randomize_lora

    import lorakit
    from lorakit.core.layers import LoraLayer

    model = lorakit.get_lora_model(tiny_llama(), lorakit.LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                                     target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, 7)
    model.save_pretrained(tmp_path / "ours")
    layers = read_adapter(tmp_path / "ours").targets
    wrapped = {n.removeprefix("model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(wrapped) == sorted(layers)
    for name, module in wrapped.items():
        torch.testing.assert_close(ar.delta_weight(layers[name].factors), module.delta_weight("default").double(),
                                   rtol=1e-6, atol=1e-7)
