"""LoRA+: parameter groups with B at lr·ratio."""

from __future__ import annotations

import pytest
import torch
from factories import MODELS

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.core.variants.loraplus import param_groups


def test_groups_put_every_b_at_ratio_times_lr_and_everything_else_at_lr():
    lm = lorakit.get_lora_model(MODELS["bert"](), LoraConfig(r=4, target_modules=["query", "value"], use_dora=True,
                                                             task_type="SEQ_CLS"))
    groups = param_groups(lm, lr=1e-3, ratio=16, weight_decay=0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    trainable = [p for p in lm.parameters() if p.requires_grad]
    assert len(by_id) == len(trainable) == sum(len(g["params"]) for g in groups)
    for layer in lm.lora_layers():
        ad = layer.adapters["default"]
        assert by_id[id(ad.lora_b)]["lr"] == pytest.approx(16e-3) and by_id[id(ad.lora_b)]["weight_decay"] == 0.1
        assert by_id[id(ad.lora_a)]["lr"] == 1e-3 and by_id[id(ad.lora_a)]["weight_decay"] == 0.1
        assert by_id[id(ad.lora_magnitude)]["lr"] == 1e-3 and by_id[id(ad.lora_magnitude)]["weight_decay"] == 0.0
    head = lm.model.classifier.copies["default"]
    assert by_id[id(head.weight)]["lr"] == 1e-3 and by_id[id(head.bias)]["weight_decay"] == 0.0


def test_sgd_step_moves_b_ratio_times_faster():
    lm = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    opt = torch.optim.SGD(param_groups(lm, lr=0.01, ratio=4))
    lm(input_ids=torch.randint(0, 128, (2, 5))).logits.square().mean().backward()
    ad = lm.model.model.layers[0].self_attn.q_proj.adapters["default"]
    a0, b0, ga, gb = ad.lora_a.detach().clone(), ad.lora_b.detach().clone(), ad.lora_a.grad.clone(), ad.lora_b.grad.clone()
    opt.step()
    torch.testing.assert_close(ad.lora_a.detach(), a0 - 0.01 * ga, rtol=0, atol=1e-7)
    torch.testing.assert_close(ad.lora_b.detach(), b0 - 0.04 * gb, rtol=0, atol=1e-7)


def test_shared_a_appears_once_and_bad_arguments_are_refused():
    lm = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=4, target_modules=["q_proj"]), "t1")
    lm.add_adapter("t2", LoraConfig(r=4, target_modules=["q_proj"], shared_a_with="t1"))
    lm.set_adapter(["t1", "t2"])
    params = [p for g in param_groups(lm, lr=1e-3) for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == 2 * 2 + 2  # 2 layers × (A, B_t1) + B_t2 per layer
    with pytest.raises(ConfigError, match="lr > 0"):
        param_groups(lm, lr=0.0)
