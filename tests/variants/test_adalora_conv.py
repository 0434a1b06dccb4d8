"""AdaLoRA on Conv2d: PEFT's SVDConv2d closed form, pruned folders both ways, a short training run
step for step against PEFT, and refusals for the conv kinds PEFT doesn't support."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lorakit
from lorakit.core.variants import AdaLoraConfig, AdaLoraConvAdapter, training_hooks
from lorakit.core.variants.adalora_budget import AdaLoraController
from lorakit.errors import TargetModuleError

SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=6, lora_alpha=8)


class Net(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups)
        self.head = nn.Linear(6 * 16, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _make(**kw):
    torch.manual_seed(0)
    return Net(**kw).eval()


def _ours(**kw):
    return lorakit.get_lora_model(_make(), AdaLoraConfig(target_modules=["conv", "head"], **{**SCHEDULE, **kw}))


def test_closed_form_and_peft_layout():
    lm = _ours(init_lora_weights=False)
    layer = lm.model.conv
    ad = layer.adapters["default"]
    assert isinstance(ad, AdaLoraConvAdapter)
    assert ad.lora_a.shape == (4, 4 * 9) and ad.lora_e.shape == (4, 1) and ad.lora_b.shape == (6, 4)
    kernel = (ad.lora_b @ (ad.lora_a * ad.lora_e) * 8 / (4 + 1e-5)).reshape(6, 4, 3, 3)
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(layer.delta_weight("default"), kernel, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(layer(x), layer.base(x) + F.conv2d(x, kernel, padding=1), rtol=1e-5, atol=1e-6)
        before = lm(x)
        lm.merge_adapter()
        torch.testing.assert_close(lm(x), before, rtol=1e-5, atol=1e-5)


def test_pruned_folder_loads_in_peft_and_back_bit_identically(tmp_path):
    lm = _ours(init_lora_weights=False)
    ctl = AdaLoraController(lm)
    for i, (_, ad) in enumerate(ctl.layers):
        ad.apply_mask(torch.arange(4) >= i + 1)  # conv keeps 3 triplets, head keeps 2
    lm.peft_config["default"].rank_pattern = ctl.rank_pattern()
    lm.eval().save_pretrained(tmp_path / "ours")
    x = torch.randn(3, 4, 4, 4)
    with torch.no_grad():
        # the reloaded adapter has rank 3 (pruned triplets dropped), like PEFT's: same sums, same bits
        ref = lorakit.LoraModel.from_pretrained(_make(), tmp_path / "ours")(x)
        torch.testing.assert_close(ref, lm(x), rtol=1e-5, atol=1e-4)  # the masked rank-4 original
        pm = peft.PeftModel.from_pretrained(_make(), tmp_path / "ours").eval()
        assert torch.equal(pm(x), ref)
        pm.save_pretrained(tmp_path / "peft")
        back = lorakit.LoraModel.from_pretrained(_make(), tmp_path / "peft")
        assert torch.equal(back(x), ref)
    assert back.model.conv.adapters["default"].rank == 3


def test_training_steps_match_peft():
    torch.manual_seed(1)
    batches = [(torch.randn(4, 4, 4, 4), torch.randint(0, 3, (4,))) for _ in range(SCHEDULE["total_step"])]
    # PEFT adds its orthogonal penalty only to model outputs that carry a .loss (not this plain
    # tensor), so both sides train without it here; the penalty itself is shape-generic
    ours = _ours(orth_reg_weight=0.0)
    pm = peft.get_peft_model(_make(), peft.AdaLoraConfig(target_modules=["conv", "head"],
                                                         orth_reg_weight=0.0, **SCHEDULE))
    with torch.no_grad():
        for path in ("conv", "head"):
            ad, layer = ours.model.get_submodule(path).adapters["default"], pm.base_model.model.get_submodule(path)
            for attr, name in (("lora_a", "lora_A"), ("lora_e", "lora_E"), ("lora_b", "lora_B")):
                getattr(ad, attr).copy_(getattr(layer, name)["default"])
    ours.train()
    pm.train()
    hooks = training_hooks(ours)
    opt_o = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    opt_p = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    for step, (x, y) in enumerate(batches):
        loss_o = F.cross_entropy(ours(x), y)
        loss_o.backward()
        opt_o.step()
        for h in hooks:
            h.step(ours, step)
        opt_o.zero_grad()
        loss_p = F.cross_entropy(pm(x), y)
        loss_p.backward()
        opt_p.step()
        pm.base_model.update_and_allocate(step)
        opt_p.zero_grad()
        torch.testing.assert_close(loss_o, loss_p, rtol=1e-5, atol=1e-6)
    pattern = {k.replace(".default", ""): v for k, v in (pm.peft_config["default"].rank_pattern or {}).items()}
    assert ours.peft_config["default"].rank_pattern == pattern
    assert sum(sum(m) for m in pattern.values()) == 2 * 2  # the final budget: target_r per layer


@pytest.mark.parametrize("make,match", [
    (lambda: nn.Sequential(nn.Conv1d(4, 6, 3)), "Conv1d"),
    (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)), "groups"),
])
def test_conv_kinds_peft_does_not_support_are_refused(make, match):
    with pytest.raises(TargetModuleError, match=match):
        lorakit.get_lora_model(make(), AdaLoraConfig(target_modules=["0"], **SCHEDULE))
