"""Shared A across tasks: one A per layer, one B per task; sharing survives save/load."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from factories import MODELS, randomize_lora
from safetensors.torch import load_file, save_file
from variant_helpers import logits

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.core.variants import SharedAAdapter

TARGETS = ["q_proj", "v_proj"]


def _tasks(n=3):
    lm = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), "t0")
    for i in range(1, n):
        lm.add_adapter(f"t{i}", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, shared_a_with="t0"))
    randomize_lora(lm)
    return lm


def _layer(lm):
    return lm.model.model.layers[0].self_attn.q_proj


def test_one_a_many_bs_and_the_closed_form():
    lm = _tasks()
    layer = _layer(lm)
    a = layer.adapters["t0"].lora_a
    assert isinstance(layer.adapters["t1"], SharedAAdapter)
    assert layer.adapters["t1"].lora_a is a and layer.adapters["t2"].lora_a is a
    assert "lora_a" not in dict(layer.adapters["t1"].named_parameters())
    x = torch.randn(3, 64)
    lm.set_adapter("t2")
    ad = layer.adapters["t2"]
    torch.testing.assert_close(layer(x), layer.base(x) + 2.0 * x @ a.T @ ad.lora_b.T, rtol=0, atol=1e-6)
    # trainable: A with its owner only; each task's B with its task
    assert not a.requires_grad and ad.lora_b.requires_grad
    lm.set_adapter(["t0", "t1", "t2"])
    assert a.requires_grad and all(layer.adapters[t].lora_b.requires_grad for t in ("t0", "t1", "t2"))
    n_params = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    assert n_params == 2 * (4 * 64 + 3 * 64 * 4) + 2 * (4 * 64 + 3 * 32 * 4)  # q (64→64), v (64→32): one A, 3 Bs


def test_mixed_batch_equals_each_task_alone_and_trains_the_shared_a(input_ids):
    lm = _tasks()
    rows = ["t0", "t1", "t2", None]
    mixed = logits(lm, input_ids, adapter_names=rows)
    for i, name in enumerate(rows):
        if name is None:
            with lm.disable_adapters():
                alone = logits(lm, input_ids[i:i + 1])
        else:
            lm.set_adapter(name)
            alone = logits(lm, input_ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=1e-6)
    lm.set_adapter(["t0", "t1", "t2"])
    lm.train()
    lm(input_ids=input_ids, adapter_names=rows).logits.square().mean().backward()
    layer = _layer(lm)
    assert layer.adapters["t0"].lora_a.grad.abs().sum() > 0  # one gradient, summed over every task's rows


def test_merge_unmerge(input_ids):
    lm = _tasks()
    lm.set_adapter(["t1", "t2"])
    ref = logits(lm, input_ids)
    lm.merge_adapter()
    torch.testing.assert_close(logits(lm, input_ids), ref, rtol=0, atol=1e-5)
    lm.unmerge_adapter()
    torch.testing.assert_close(logits(lm, input_ids), ref, rtol=0, atol=1e-5)


def test_folders_load_standalone_in_peft_and_keep_the_sharing_in_lorakit(tmp_path, input_ids):
    lm = _tasks()
    lm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "t1" / "adapter_config.json").read_text())["shared_a_with"] == "t0"
    assert "shared_a_with" not in json.loads((tmp_path / "t0" / "adapter_config.json").read_text())
    for name in ("t0", "t1"):
        lm.set_adapter(name)
        pm = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path / name)
        assert torch.equal(logits(pm, input_ids), logits(lm, input_ids))
    back = lorakit.LoraModel.from_pretrained(MODELS["llama"](), tmp_path / "t0", adapter_name="t0")
    back.load_adapter(tmp_path / "t1", "t1")
    back.load_adapter(tmp_path / "t2", "t2")
    layer = _layer(back)
    assert layer.adapters["t1"].lora_a is layer.adapters["t0"].lora_a is layer.adapters["t2"].lora_a
    back.set_adapter("t2")
    lm.set_adapter("t2")
    assert torch.equal(logits(back, input_ids), logits(lm, input_ids))


def test_a_folder_whose_a_differs_or_whose_owner_is_missing_loads_standalone(tmp_path, input_ids):
    lm = _tasks(2)
    lm.save_pretrained(tmp_path)
    lm.set_adapter("t1")
    ref = logits(lm, input_ids)
    with pytest.warns(UserWarning, match="not loaded"):
        alone = lorakit.LoraModel.from_pretrained(MODELS["llama"](), tmp_path / "t1", adapter_name="t1")
    assert not isinstance(_layer(alone).adapters["t1"], SharedAAdapter)
    assert torch.equal(logits(alone, input_ids), ref)
    tensors = load_file(tmp_path / "t1" / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, tmp_path / "t1" / "adapter_model.safetensors")
    host = lorakit.LoraModel.from_pretrained(MODELS["llama"](), tmp_path / "t0", adapter_name="t0")
    owner_a = _layer(host).adapters["t0"].lora_a.detach().clone()
    with pytest.warns(UserWarning, match="differs"):
        host.load_adapter(tmp_path / "t1", "t1")
    assert torch.equal(_layer(host).adapters["t0"].lora_a, owner_a)  # the owner's A is untouched
    assert torch.equal(_layer(host).adapters["t1"].lora_a, tensors[key])


def test_bad_sharing_is_refused():
    lm = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=4, target_modules=["q_proj"]), "t0")
    with pytest.raises(ConfigError, match="not on this layer"):
        lm.add_adapter("x", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], shared_a_with="t0"))
    with pytest.raises(ConfigError, match="same r"):
        lm.add_adapter("y", LoraConfig(r=2, target_modules=["q_proj"], shared_a_with="t0"))
    with pytest.raises(ConfigError, match="can't be combined"):
        LoraConfig(r=4, target_modules=["q_proj"], shared_a_with="t0", use_dora=True)
    assert sorted(lm.peft_config) == ["t0"]  # failed adds leave nothing behind
