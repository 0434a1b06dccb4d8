"""LoRA on convs PEFT lays out its own way: grouped convs (full A, grouped 1×1 B) and convs with
dilation or a non-zero padding_mode (A runs without them, as PEFT's lora_A): closed forms, PEFT
parity, and merges refused before anything changes."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.core.layers import LoraConv
from lorakit.errors import MergeError, TargetModuleError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4 * 25)
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)

    def forward(self, x):
        return self.conv(self.lin(x).reshape(-1, 4, 5, 5))


def _make():
    torch.manual_seed(0)
    return Net().eval()


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_shapes_and_closed_form_per_group():
    lm = lorakit.get_lora_model(_make(), LoraConfig(r=4, lora_alpha=6, target_modules=["conv"]))
    _randomize(lm)
    layer = lm.model.conv
    ad = layer.adapters["default"]
    assert isinstance(layer, LoraConv) and ad.lora_a.shape == (4, 4, 3, 3) and ad.lora_b.shape == (6, 2, 1, 1)
    x = torch.randn(3, 4, 5, 5)
    u = F.conv2d(x, ad.lora_a, padding=1)  # A over every input channel: (3, 4, 5, 5)
    # output channels 0-2 read rank channels 0-1, channels 3-5 read rank channels 2-3
    lora = torch.cat([torch.einsum("or,nrhw->nohw", ad.lora_b[3 * g:3 * g + 3, :, 0, 0], u[:, 2 * g:2 * g + 2])
                      for g in range(2)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + 1.5 * lora, rtol=1e-5, atol=1e-5)


def test_rank_not_divisible_by_groups_is_refused_with_the_fix():
    with pytest.raises(TargetModuleError, match="divisible by groups"):
        lorakit.get_lora_model(_make(), LoraConfig(r=3, target_modules=["conv"]))
    lm = lorakit.get_lora_model(_make(), LoraConfig(r=3, target_modules=["conv", "lin"], rank_pattern={"conv": 2}))
    assert lm.model.conv.adapters["default"].rank == 2


def test_merge_is_refused_before_any_layer_changes():
    lm = lorakit.get_lora_model(_make(), LoraConfig(r=2, target_modules=["lin", "conv"]))
    _randomize(lm)
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    x = torch.randn(2, 6)
    before = lm(x)
    for call in (lm.merge_adapter, lm.merge_and_unload):
        with pytest.raises(MergeError, match="grouped Conv2d"):
            call()
        assert all(torch.equal(v, weights[k]) for k, v in lm.model.state_dict().items())
        assert not lm.model.lin.merged_adapters
        assert torch.equal(lm(x), before)


def test_mixed_batch_equals_each_adapter_alone():
    lm = lorakit.get_lora_model(_make(), LoraConfig(r=2, target_modules=["conv"]), "a")
    lm.add_adapter("b", LoraConfig(r=4, lora_alpha=3, target_modules=["conv", "lin"]))
    _randomize(lm)
    x = torch.randn(4, 6)
    names = ["a", None, "b", "a"]
    with torch.no_grad():
        mixed = lm(x, adapter_names=names)
        alone = {}
        for name in ("a", "b"):
            lm.set_adapter(name)
            alone[name] = lm(x)
        with lm.disable_adapters():
            alone[None] = lm(x)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(use_dora=True), dict(use_dylora=True)])
def test_weight_space_variants_are_refused(kwargs):
    with pytest.raises(TargetModuleError, match="grouped convolution"):
        lorakit.get_lora_model(_make(), LoraConfig(r=2, target_modules=["conv"], **kwargs))


def test_analysis_tools_refuse_a_grouped_conv_folder_by_name(tmp_path):
    from lorakit.analysis.errors import UnsupportedAdapterError
    from lorakit.analysis.factors import read_adapter

    lorakit.get_lora_model(_make(), LoraConfig(r=4, target_modules=["conv"])).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedAdapterError, match="grouped convolution"):
        read_adapter(tmp_path)


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2),
    lambda: nn.Conv1d(3, 4, 3, padding=2, padding_mode="circular"),
])
def test_dilation_and_padding_mode_follow_peft_and_merging_is_refused(conv, tmp_path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(conv()).eval()

    pm = peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path)
    x = torch.randn(2, 3, *([7] * (make()[0].weight.dim() - 2)))
    lm = lorakit.LoraModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        ref = pm(x)
        assert torch.equal(lm(x), ref)
        ad, base = lm.model[0].adapters["default"], lm.model[0].base
        fn = F.conv2d if x.dim() == 4 else F.conv1d
        u = fn(x, ad.lora_a, None, base.stride, base.padding)  # dilation 1, zero padding: PEFT's lora_A
        torch.testing.assert_close(lm(x), base(x) + ad.scaling * fn(u, ad.lora_b), rtol=1e-5, atol=1e-5)
    with pytest.raises(MergeError, match="dilation|padding_mode"):
        lm.merge_adapter()
    with torch.no_grad():
        assert torch.equal(lm(x), ref)


@pytest.mark.parametrize("how", ["cat", "svd", "linear"])
def test_weighted_combination_of_grouped_conv_adapters_is_refused(how):
    lm = lorakit.get_lora_model(_make(), LoraConfig(r=2, target_modules=["conv"]), "a")
    lm.add_adapter("b", LoraConfig(r=2, target_modules=["conv"]))
    with pytest.raises(ConfigError, match="grouped convolution"):
        lm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab", combination_type=how)
    assert "ab" not in lm.peft_config
