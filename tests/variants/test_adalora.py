"""AdaLoRA: ΔW closed form, budget schedule, masking to the budget, a training run step for step
against PEFT (masks, weights, rank_pattern), folders both ways with pruned triplets dropped."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from factories import MODELS, randomize_lora
from safetensors.torch import load_file
from variant_helpers import logits

import lorakit
from lorakit import ConfigError
from lorakit.core.variants import AdaLoraAdapter, AdaLoraConfig, orthogonal_loss, training_hooks
from lorakit.core.variants.adalora_budget import AdaLoraController

TARGETS = ["q_proj", "v_proj", "up_proj"]
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, lora_alpha=8, beta1=0.8, beta2=0.9,
                task_type="CAUSAL_LM")  # PEFT adds its orthogonal penalty only through its task-type models


def _ours(**kw):
    return lorakit.get_lora_model(MODELS["llama"](), AdaLoraConfig(target_modules=TARGETS, **{**SCHEDULE, **kw}))


def _peft(**kw):
    return peft.get_peft_model(MODELS["llama"](), peft.AdaLoraConfig(target_modules=TARGETS, **{**SCHEDULE, **kw}))


def _pairs(ours, pm):
    """(our adapter, PEFT layer) for every adapted module."""
    for path, module in ours.model.named_modules():
        if isinstance(module, lorakit.core.layers.LoraLayer):
            yield module.adapters["default"], pm.base_model.model.get_submodule(path)


def _copy_to_peft(ours, pm):
    with torch.no_grad():
        for ad, layer in _pairs(ours, pm):
            layer.lora_A["default"].copy_(ad.lora_a)
            layer.lora_E["default"].copy_(ad.lora_e)
            layer.lora_B["default"].copy_(ad.lora_b)


def test_delta_and_output_closed_form():
    lm = _ours(init_lora_weights=False)
    layer = lm.model.model.layers[0].self_attn.q_proj
    ad = layer.adapters["default"]
    assert isinstance(ad, AdaLoraAdapter) and ad.rank == 4
    expected = ad.lora_b @ (ad.lora_a * ad.lora_e) * 8 / (4 + 1e-5)
    torch.testing.assert_close(layer.delta_weight("default"), expected, rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ expected.T, rtol=1e-5, atol=1e-6)


def test_init_is_peft_s_and_leaves_the_output_unchanged(input_ids):
    lm = _ours()
    ref = logits(MODELS["llama"](), input_ids)
    assert torch.equal(logits(lm, input_ids), ref)
    ad = lm.model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert torch.equal(ad.lora_e, torch.zeros(4, 1)) and 0.01 < ad.lora_a.std() < 0.03


@pytest.mark.parametrize("step,expected", [(0, 24), (2, 24), (3, 19), (4, 16), (5, 14), (6, 12), (9, 12), (10, 12),
                                           (12, 12)])
def test_budget_schedule_closed_form_and_peft(step, expected):
    lm = _ours()
    ctl = AdaLoraController(lm)
    # b0 = 4·6 = 24, bT = 2·6 = 12, middle phase t ∈ (2, 9]: ⌊12·(1 − (t − 2)/7)³ + 12⌋, e.g. t=4: ⌊16.37⌋
    assert (ctl.init_budget, ctl.target_budget) == (24, 12)
    budget, _ = ctl.budget(step)
    assert budget == expected
    pm = _peft()
    assert pm.base_model.rankallocator.budget_schedule(step) == ctl.budget(step)


def test_masking_keeps_exactly_the_budget_and_the_best_triplets():
    lm = _ours()
    ctl = AdaLoraController(lm)
    g = torch.Generator().manual_seed(0)
    for path, ad in ctl.layers:  # distinct, known scores: only Λ's importance is non-zero
        for attr in ("lora_a", "lora_e", "lora_b"):
            p = getattr(ad, attr)
            ctl.exp_avg_ipt[(path, attr)] = torch.rand(p.shape, generator=g) * (attr == "lora_e")
            ctl.exp_avg_unc[(path, attr)] = torch.ones_like(p)
    scores = torch.cat(list(ctl.triplet_scores().values()))
    for budget in (20, 15, 12):
        pattern = ctl.mask_to_budget(budget)
        assert sum(map(sum, pattern.values())) == budget
        kept = torch.cat([ad.kept for _, ad in ctl.layers])
        assert torch.equal(kept, scores >= scores.sort(descending=True).values[budget - 1])
        assert all(torch.equal(ad.lora_e[~ad.kept], torch.zeros(int((~ad.kept).sum()), 1)) for _, ad in ctl.layers)


def test_controller_state_round_trips_for_resuming():
    lm = _ours(init_lora_weights=False)
    ctl = AdaLoraController(lm)
    lm(input_ids=torch.randint(0, 128, (2, 6))).logits.square().mean().backward()
    for step in range(5):
        ctl.step(lm, step)
    state = ctl.state_dict()
    assert sum(ctl.kept_ranks().values()) == ctl.budget(4)[0] < 24
    fresh = _ours(init_lora_weights=False)  # same weights (same seed); masks and EMAs from the state
    other = AdaLoraController()
    other.load_state_dict(state, fresh)
    assert other.kept_ranks() == ctl.kept_ranks()
    assert fresh.peft_config["default"].rank_pattern == lm.peft_config["default"].rank_pattern
    assert all(torch.equal(other.exp_avg_unc[k], v) for k, v in ctl.exp_avg_unc.items())


def test_orthogonal_loss_closed_form():
    lm = _ours(init_lora_weights=False, orth_reg_weight=0.3)
    terms = []
    for _, ad in AdaLoraController(lm).layers:
        terms.append(torch.linalg.norm(ad.lora_a @ ad.lora_a.T - torch.eye(4)))
        terms.append(torch.linalg.norm(ad.lora_b.T @ ad.lora_b - torch.eye(4)))
    torch.testing.assert_close(orthogonal_loss(lm), 0.3 * torch.stack(terms).mean(), rtol=1e-6, atol=0)


def test_pruned_folders_load_both_ways_with_identical_outputs(tmp_path, input_ids):
    ours = _ours()
    randomize_lora(ours, seed=3)
    ctl = AdaLoraController(ours)
    for i, (_, ad) in enumerate(ctl.layers):  # prune a different number of triplets per layer
        ad.apply_mask(torch.arange(4) >= i % 4)
    ours.peft_config["default"].rank_pattern = ctl.rank_pattern()
    ours.eval().save_pretrained(tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A"].shape == (3, 64)  # 2nd layer: 1 cut
    pm = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path / "ours").eval()
    ref = logits(ours, input_ids)
    torch.testing.assert_close(logits(pm, input_ids), ref, rtol=0, atol=2e-6)
    pm.save_pretrained(tmp_path / "peft")
    back = lorakit.LoraModel.from_pretrained(MODELS["llama"](), tmp_path / "peft")
    torch.testing.assert_close(logits(back, input_ids), ref, rtol=0, atol=2e-6)
    assert back.peft_config["default"].rank_pattern == ours.peft_config["default"].rank_pattern


@pytest.mark.slow
def test_training_run_matches_peft_step_for_step(tmp_path):
    torch.manual_seed(7)
    batches = [torch.randint(0, 128, (4, 12)) for _ in range(SCHEDULE["total_step"] + 2)]
    ours, pm = _ours(), _peft()
    randomize_lora(ours, seed=3)  # non-zero Λ so every factor gets a gradient from step 0
    _copy_to_peft(ours, pm)
    ours.train()
    pm.train()
    hooks = training_hooks(ours)
    assert [type(h).__name__ for h in hooks] == ["AdaLoraController"]
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    opt_p = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    for step, ids in enumerate(batches):
        out = ours(input_ids=ids, labels=ids)
        loss = out.loss + sum(h.extra_loss(ours) for h in hooks)
        loss.backward()
        opt_o.step()
        for h in hooks:
            h.step(ours, step)
        opt_o.zero_grad()
        peft_loss = pm(input_ids=ids, labels=ids).loss  # PEFT adds its orthogonal penalty itself
        peft_loss.backward()
        opt_p.step()
        pm.base_model.update_and_allocate(step)
        opt_p.zero_grad()
        torch.testing.assert_close(loss, peft_loss, rtol=1e-5, atol=1e-6)
        pattern = pm.peft_config["default"].rank_pattern or {}
        for path, module in ours.model.named_modules():
            if isinstance(module, lorakit.core.layers.LoraLayer):
                ad, layer = module.adapters["default"], pm.base_model.model.get_submodule(path)
                peft_kept = pattern.get(f"{path}.lora_E.default", [True] * 4)
                assert ad.kept.tolist() == peft_kept, f"step {step}"
                torch.testing.assert_close(ad.lora_e, layer.lora_E["default"], rtol=1e-4, atol=1e-6)
    kept = hooks[0].kept_ranks()
    assert sum(kept.values()) == 12 and len(set(kept.values())) > 1  # budget met, ranks differ by layer
    peft_pattern = {k.replace(".default", ""): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    assert ours.peft_config["default"].rank_pattern == peft_pattern

    # saving drops the pruned triplets and records the pattern; PEFT loads it with identical outputs
    ours.eval()
    pm.eval()
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] == peft_pattern
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{q0}.lora_E"].shape == (kept["model.layers.0.self_attn.q_proj"], 1)
    ids = batches[0]
    ref = logits(ours, ids)
    torch.testing.assert_close(logits(pm, ids), ref, rtol=1e-4, atol=1e-5)
    loaded_in_peft = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(loaded_in_peft, ids), ref, rtol=0, atol=2e-6)
    pm.save_pretrained(tmp_path / "peft")
    loaded_in_ours = lorakit.LoraModel.from_pretrained(MODELS["llama"](), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded_in_ours, ids), logits(pm, ids), rtol=0, atol=2e-6)
    layer = loaded_in_ours.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.adapters["default"].rank == kept["model.layers.0.self_attn.q_proj"]
    # and the reloaded adapter saves back to the same files
    loaded_in_ours.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(again) == sorted(tensors)
    assert all(torch.equal(again[k], load_file(tmp_path / "peft" / "adapter_model.safetensors")[k]) for k in again)


def test_merge_unmerge_and_config_validation(input_ids):
    lm = _ours(init_lora_weights=False)
    ref = logits(lm, input_ids)
    lm.merge_adapter()
    torch.testing.assert_close(logits(lm, input_ids), ref, rtol=0, atol=1e-5)
    lm.unmerge_adapter()
    torch.testing.assert_close(logits(lm, input_ids), ref, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="total_step"):
        AdaLoraConfig(target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="budgeting phase"):
        AdaLoraConfig(target_modules=["q_proj"], total_step=10, tinit=5, tfinal=5)
    with pytest.raises(lorakit.TargetModuleError, match="Linear-like"):
        lorakit.get_lora_model(MODELS["llama"](), AdaLoraConfig(target_modules=["embed_tokens"], total_step=10))
