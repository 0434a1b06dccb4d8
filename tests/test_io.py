"""Adapter folders: bad input gives clear errors and never leaves a half-changed model or folder."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from factories import randomize_lora, tiny_llama
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterLoadError, LoraConfig
from lorakit.io import atomic


def _saved(tmp_path, **cfg):
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **cfg))
    randomize_lora(lm)
    lm.save_pretrained(tmp_path)
    return lm


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def _assert_unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)
    assert [type(m).__name__ for m in model.modules()] == types


def test_missing_folder_and_missing_files(tmp_path):
    with pytest.raises(AdapterLoadError, match="is not a folder"):
        lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path / "nope")
    with pytest.raises(AdapterLoadError, match="adapter_config.json is missing"):
        lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
    with pytest.raises(AdapterLoadError, match="no adapter_model.safetensors"):
        lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path)


def test_truncated_and_corrupt_safetensors(tmp_path):
    _saved(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    host = lorakit.get_lora_model(tiny_llama(), LoraConfig(target_modules=["o_proj"]), "keep")
    snap = _snapshot(host)
    with pytest.raises(AdapterLoadError, match="truncated or corrupt"):
        host.load_adapter(tmp_path, adapter_name="new")
    _assert_unchanged(host, snap)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterLoadError, match="truncated or corrupt"):
        lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path)


def test_corrupt_config_json(tmp_path):
    _saved(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path)


def test_shape_mismatch_names_key_and_both_shapes_and_leaves_model_unchanged(tmp_path):
    _saved(tmp_path)
    host = lorakit.get_lora_model(tiny_llama(hidden_size=32, intermediate_size=64), LoraConfig(target_modules=["k_proj"]))
    snap = _snapshot(host)
    with pytest.raises(AdapterLoadError, match=r"q_proj\.lora_A\.weight.*\(4, 64\).*\(4, 32\)"):
        host.load_adapter(tmp_path, adapter_name="other")
    _assert_unchanged(host, snap)
    assert list(host.peft_config) == ["default"]


def test_missing_keys_are_an_error(tmp_path):
    _saved(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layers.1" not in k}, tmp_path / "adapter_model.safetensors")
    base = tiny_llama()
    snap = _snapshot(base)
    with pytest.raises(AdapterLoadError, match="lacks 4 tensor"):
        lorakit.LoraModel.from_pretrained(base, tmp_path)
    state, _ = snap
    assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items())


def test_unknown_config_values_are_refused_at_load(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["r"] = -1
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match="r must be"):
        lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path)


def test_legacy_bin_is_read_with_weights_only(tmp_path, input_ids):
    lm = _saved(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    loaded = lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(loaded(input_ids).logits, lm(input_ids).logits)


def test_legacy_bin_with_arbitrary_pickle_is_refused(tmp_path):
    _saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(AdapterLoadError, match="never unpickles"):
        lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path)


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch, input_ids):
    lm = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomize_lora(lm, seed=9)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    siblings = sorted(p.name for p in tmp_path.parent.iterdir())
    monkeypatch.setattr(atomic.os, "replace", crash)  # the swap fails, whichever way it is done
    monkeypatch.setattr(atomic, "_exchange", crash)
    with pytest.raises(OSError, match="disk full"):
        lm.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == siblings  # no temporary folder left beside it
    monkeypatch.undo()
    lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path)(input_ids)


def test_unknown_peft_keys_are_kept_and_a_missing_lora_bias_is_refused(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["some_future_option"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    lm = lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path)
    assert lm.peft_config["default"].extra["some_future_option"] == 3
    cfg["lora_bias"] = True  # says lora_B has a bias, but the file carries none: refused, not zero-filled
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match="lora_B.bias"):
        lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path)


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    _saved(tmp_path)
    frozen = lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * (4 * 128 + 4 * 96)


def test_shared_folder_save_replaces_files_in_place_and_keeps_what_others_write_meanwhile(tmp_path, monkeypatch):
    """A Trainer checkpoint under DDP: while rank 0 saves the adapter, the other ranks write their RNG
    state into the same folder. The shared save never swaps the folder, so a file written mid-save stays
    (a swapped folder would carry it into the old folder and lose it, or race its copy)."""
    from lorakit.io import adapter_folder

    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_lora(lm)
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "rng_state_0.pth").write_bytes(b"rank 0")
    inode = folder.stat().st_ino
    real = adapter_folder.atomic_write_bytes

    def other_rank_writes_meanwhile(path, data):
        (folder / "rng_state_1.pth").write_bytes(b"rank 1")
        real(path, data)

    monkeypatch.setattr(adapter_folder, "atomic_write_bytes", other_rank_writes_meanwhile)
    lm.save_pretrained(folder, shared_folder=True)
    assert folder.stat().st_ino == inode  # the same folder, never swapped
    assert (folder / "rng_state_0.pth").read_bytes() == b"rank 0"
    assert (folder / "rng_state_1.pth").read_bytes() == b"rank 1"
    saved = load_file(folder / "adapter_model.safetensors")
    ours = {k: v for k, v in lm.model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(ours) > 0
    reloaded = lorakit.LoraModel.from_pretrained(tiny_llama(), folder)
    for name, p in reloaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, dict(lm.named_parameters())[name])
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"]  # no temp files
