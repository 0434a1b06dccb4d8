"""PEFT-format interop both ways, checked against the real peft package."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from factories import MODELS, randomize_lora
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig

CASES = {
    "llama-qv": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-patterns": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear",
                                                rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 16})),
    "llama-embed-layers": ("llama", dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "o_proj"],
                                         layers_to_transform=[1])),
    "qwen2-rslora": ("qwen2", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "bert-seqcls": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
    "bert-regex-save": ("bert", dict(r=2, lora_alpha=2, target_modules=r".*attention\.self\.(query|key)",
                                     modules_to_save=["classifier"])),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_written_adapter_loads_with_identical_outputs(case, tmp_path, input_ids):
    kind, kwargs = CASES[case]
    make = MODELS[kind]
    pm = peft.get_peft_model(make(), peft.LoraConfig(**kwargs))
    randomize_lora(pm)
    if "modules_to_save" in kwargs or kwargs.get("task_type") == "SEQ_CLS":
        with torch.no_grad():
            pm.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    pm.eval()
    pm.save_pretrained(tmp_path)
    ref = _logits(pm, input_ids)

    ours = lorakit.LoraModel.from_pretrained(make(), tmp_path)
    assert torch.equal(_logits(ours, input_ids), ref)
    # and through load_adapter under another name
    host = lorakit.get_lora_model(make(), LoraConfig(r=2, target_modules=["q_proj" if kind != "bert" else "query",
                                                                          ] if kind != "gpt2" else ["c_proj"]), "x")
    host.load_adapter(tmp_path, adapter_name="peft")
    host.set_adapter("peft")
    assert torch.equal(_logits(host, input_ids), ref)


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_adapter_loads_in_peft_with_identical_outputs(case, tmp_path, input_ids):
    kind, kwargs = CASES[case]
    make = MODELS[kind]
    ours = lorakit.get_lora_model(make(), LoraConfig(**kwargs))
    randomize_lora(ours)
    if hasattr(ours.model, "classifier") and hasattr(ours.model.classifier, "copies"):
        with torch.no_grad():
            ours.model.classifier.copies["default"].weight.normal_()
    ours.eval()
    ours.save_pretrained(tmp_path)
    ref = _logits(ours, input_ids)
    pm = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert torch.equal(_logits(pm, input_ids), ref)


def test_saved_files_are_peft_format(tmp_path):
    lm = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=4, target_modules=["q_proj"]))
    lm.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"]))
    lm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["inference_mode"] is True
    assert list(config) == sorted(config)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight"
                            for i in range(2) for ab in "AB"}
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    # a non-default adapter goes to a subfolder named after it, as PEFT does
    assert (tmp_path / "second" / "adapter_config.json").is_file()
    assert not list(tmp_path.glob("**/*.tmp"))


def test_peft_multi_adapter_folder_roundtrip(tmp_path, input_ids):
    make = MODELS["llama"]
    pm = peft.get_peft_model(make(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.add_adapter("other", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    randomize_lora(pm)
    pm.eval()
    pm.save_pretrained(tmp_path)
    pm.set_adapter("other")
    ref_other = _logits(pm, input_ids)
    ours = lorakit.LoraModel.from_pretrained(make(), tmp_path)
    ours.load_adapter(tmp_path / "other", adapter_name="other")
    ours.set_adapter("other")
    assert torch.equal(_logits(ours, input_ids), ref_other)


def test_mixed_batch_matches_peft_adapter_names(tmp_path, input_ids):
    make = MODELS["llama"]
    pm = peft.get_peft_model(make(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=2, target_modules=["v_proj", "gate_proj"]))
    randomize_lora(pm)
    pm.eval()
    names = ["a", "__base__", "b", "a"]
    with torch.no_grad():
        ref = pm(input_ids=input_ids, adapter_names=names).logits
    pm.save_pretrained(tmp_path)
    ours = lorakit.LoraModel.from_pretrained(make(), tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    got = _logits_mixed(ours, input_ids, [None if n == "__base__" else n for n in names])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _logits_mixed(model, ids, names):
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=names).logits
