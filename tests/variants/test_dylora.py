"""DyLoRA: truncation equals a separately built rank-b adapter; per-step rank draws; rank sweep."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from factories import MODELS, randomize_lora
from variant_helpers import logits

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.core.variants import DyLoraAdapter, set_rank, training_hooks
from lorakit.core.variants.dylora import DyLoraController, plot_rank_sweep, rank_sweep

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def _dylora(r=6, **kw):
    lm = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=r, lora_alpha=12, target_modules=TARGETS,
                                                              use_dylora=True, **kw))
    randomize_lora(lm)
    return lm


@pytest.mark.parametrize("use_rslora", [False, True])
def test_truncation_equals_a_separately_built_rank_b_adapter(use_rslora, input_ids):
    lm = _dylora(use_rslora=use_rslora)
    for b in (1, 3, 6):
        plain = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=b, lora_alpha=12, target_modules=TARGETS,
                                                                     use_rslora=use_rslora))
        with torch.no_grad():
            for mine, theirs in zip(lm.lora_layers(), plain.lora_layers()):
                ad = mine.adapters["default"]
                theirs.adapters["default"].lora_a.copy_(ad.lora_a[:b])
                theirs.adapters["default"].lora_b.copy_(ad.lora_b[:, :b])
        set_rank(lm, b)  # (the plain adapter may take the fused kernel: equal to fp32 rounding, not bitwise)
        torch.testing.assert_close(logits(lm, input_ids), logits(plain, input_ids), rtol=0, atol=1e-6)
        layer = lm.model.model.layers[0].self_attn.q_proj
        torch.testing.assert_close(layer.delta_weight("default"),
                                   plain.model.model.layers[0].self_attn.q_proj.delta_weight("default"), rtol=0, atol=0)


def test_training_uses_the_drawn_rank_and_only_its_factors_get_gradients():
    lm = _dylora()
    lm.train()
    hooks = training_hooks(lm)
    assert [type(h).__name__ for h in hooks] == ["DyLoraController"]
    ctl = hooks[0]
    draws = [ctl.rank_for_step(t) for t in range(200)]
    assert set(draws) == set(range(1, 7)) and draws == [ctl.rank_for_step(t) for t in range(200)]  # reproducible
    ctl.step(lm, 4)  # after step 4: the rank of step 5
    b = ctl.rank_for_step(5)
    ad = lm.model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert isinstance(ad, DyLoraAdapter) and ad.train_rank == b and ad.current_rank() == b
    lm(input_ids=torch.randint(0, 128, (2, 5))).logits.square().mean().backward()
    assert ad.lora_a.grad[:b].abs().sum() > 0 and ad.lora_b.grad[:, :b].abs().sum() > 0
    assert torch.equal(ad.lora_a.grad[b:], torch.zeros_like(ad.lora_a[b:]))
    assert torch.equal(ad.lora_b.grad[:, b:], torch.zeros_like(ad.lora_b[:, b:]))
    lm.eval()
    assert ad.current_rank() == 6  # eval runs at the active rank (default r)


def test_rank_sweep_evaluates_each_rank_and_restores(tmp_path, input_ids):
    lm = _dylora()
    set_rank(lm, 5)
    full = logits(lm, input_ids)

    def metric(model):
        return float(model(input_ids=input_ids).logits.square().mean())

    results = rank_sweep(lm, metric, ranks=[1, 2, 6])
    assert list(results) == [1, 2, 6]
    set_rank(lm, 2)
    assert results[2] == metric(lm)
    set_rank(lm, 5)
    assert torch.equal(logits(lm, input_ids), full)
    assert list(rank_sweep(lm, metric)) == [1, 2, 3, 4, 5, 6]
    png = plot_rank_sweep(results, tmp_path / "sweep.png", metric="mean logit²")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="1..6"):
        set_rank(lm, 7)
    with pytest.raises(ConfigError, match="no DyLoRA"):
        set_rank(lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=2, target_modules=["q_proj"])), 1)


def test_merge_unmerge_at_the_active_rank(input_ids):
    lm = _dylora()
    set_rank(lm, 3)
    ref = logits(lm, input_ids)
    lm.merge_adapter()
    torch.testing.assert_close(logits(lm, input_ids), ref, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="merged"):
        set_rank(lm, 2)
    lm.unmerge_adapter()
    torch.testing.assert_close(logits(lm, input_ids), ref, rtol=0, atol=1e-5)


def test_folder_keeps_use_dylora_and_loads_in_peft_at_full_rank(tmp_path, input_ids):
    lm = _dylora()
    lm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dylora"] is True
    back = lorakit.LoraModel.from_pretrained(MODELS["llama"](), tmp_path)
    set_rank(back, 2)
    set_rank(lm, 2)
    assert torch.equal(logits(back, input_ids), logits(lm, input_ids))
    set_rank(lm, 6)
    with pytest.warns(UserWarning, match="use_dylora"):
        pm = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path)
    assert torch.equal(logits(pm, input_ids), logits(lm, input_ids))


def test_controller_needs_a_dylora_adapter():
    with pytest.raises(ConfigError):
        DyLoraController(lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=2, target_modules=["q_proj"])))
