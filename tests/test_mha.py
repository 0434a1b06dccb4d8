"""LoRA on nn.MultiheadAttention: PEFT's arithmetic (out_proj delta twice), gradients, masks,
the encoder-layer fast path, mixed batches and refusals. File round trips are in tests/peft_zoo."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn as nn

import lorakit
from lorakit import LoraConfig
from lorakit.core.layers import LoraMultiheadAttention
from lorakit.errors import TargetModuleError


class Attn(nn.Module):
    def __init__(self, batch_first=True, **kw):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kw)
        self.head = nn.Linear(8, 3)

    def forward(self, x, **kw):
        return self.head(self.mha(x, x, x, **kw)[0])


def _make(seed=0, **kw):
    torch.manual_seed(seed)
    return Attn(**kw).eval()


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name or ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_forward_is_the_base_with_peft_s_effective_weights():
    lm = lorakit.get_lora_model(_make(batch_first=False), LoraConfig(r=4, lora_alpha=8, target_modules=["mha"]))
    _randomize(lm)
    layer = lm.model.mha
    assert isinstance(layer, LoraMultiheadAttention)
    ad = layer.adapters["default"]
    x = torch.randn(5, 8)  # unbatched (L, E)
    ref = nn.MultiheadAttention(8, 2).eval()
    with torch.no_grad():
        ref.load_state_dict(layer.base.state_dict())
        ref.in_proj_weight += (ad.lora_b @ ad.lora_a) * 2.0
        out_delta = (ad.out_b @ ad.out_a) * 2.0
        ref.out_proj.weight.copy_(ref.out_proj.weight + out_delta + out_delta)  # twice, as PEFT 0.21
        assert torch.equal(layer(x, x, x)[0], ref(x, x, x)[0])
        assert torch.equal(lm(x), lm.model.head(ref(x, x, x)[0]))


def test_outputs_and_gradients_match_peft_in_training():
    x = torch.randn(3, 4, 8)
    pm = peft.get_peft_model(_make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["mha"],
                                                      init_lora_weights=False))
    lm = lorakit.get_lora_model(_make(), LoraConfig(r=4, lora_alpha=8, target_modules=["mha"]))
    inner = pm.base_model.model.mha
    ad = lm.model.mha.adapters["default"]
    pairs = [(ad.lora_a, inner.lora_A["default"].weight), (ad.lora_b, inner.lora_B["default"].weight),
             (ad.out_a, inner.base_layer.out_proj.lora_A["default"].weight),
             (ad.out_b, inner.base_layer.out_proj.lora_B["default"].weight)]
    with torch.no_grad():
        for ours, theirs in pairs:
            ours.copy_(theirs)
    pm.train()
    lm.train()
    y_peft, y_ours = pm(x), lm(x)
    assert torch.equal(y_ours, y_peft)
    y_peft.square().sum().backward()
    y_ours.square().sum().backward()
    for ours, theirs in pairs:
        assert torch.equal(ours.grad, theirs.grad)
    assert lm.model.mha.base.in_proj_weight.grad is None  # the frozen base gets no gradient


def test_merge_equals_unmerged_forward_and_unmerge_restores_within_rounding():
    lm = lorakit.get_lora_model(_make(batch_first=False), LoraConfig(r=4, lora_alpha=8, target_modules=["mha"]))
    _randomize(lm)
    x = torch.randn(5, 8)
    base = lm.model.mha.base
    w_in, w_out = base.in_proj_weight.detach().clone(), base.out_proj.weight.detach().clone()
    before = lm(x)
    lm.merge_adapter()
    assert torch.equal(lm(x), before)  # same weights, same arithmetic
    lm.unmerge_adapter()
    ad = lm.model.mha.adapters["default"]
    u = 2.0**-24
    # each of the 2 (in) / 4 (out) additions rounds once, at the scale of |W| + |ΔW|
    bound_in = 4 * u * (w_in.abs() + ad.in_delta().abs()).detach()
    bound_out = 8 * u * (w_out.abs() + 2 * ad.out_delta().abs()).detach()
    assert ((base.in_proj_weight - w_in).abs() <= bound_in).all()
    assert ((base.out_proj.weight - w_out).abs() <= bound_out).all()
    plain = lm.merge_and_unload()
    assert type(plain.mha) is nn.MultiheadAttention and isinstance(plain.mha.in_proj_weight, nn.Parameter)


def test_transformer_encoder_fast_path_does_not_skip_lora():
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        base_out = enc(x)
        lm = lorakit.get_lora_model(enc, LoraConfig(r=2, target_modules=["self_attn"]))
        _randomize(lm)
        lora_out = lm(x)
        lm.merge_adapter()  # merged: the plain layer (fast path allowed) with the merged weights
        merged_out = lm(x)
    assert not torch.allclose(lora_out, base_out)
    torch.testing.assert_close(lora_out, merged_out, rtol=1e-5, atol=1e-5)


def test_mixed_batch_with_key_padding_mask_equals_each_adapter_alone():
    lm = lorakit.get_lora_model(_make(), LoraConfig(r=4, target_modules=["mha"]), "a")
    lm.add_adapter("b", LoraConfig(r=2, lora_alpha=6, target_modules=["mha", "head"]))
    _randomize(lm)
    x = torch.randn(4, 5, 8)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[1, 3:] = True
    mask[2, 4:] = True
    names = ["b", "a", None, "b"]
    with torch.no_grad():
        mixed = lm(x, adapter_names=names, key_padding_mask=mask)
        alone = {}
        for name in ("a", "b"):
            lm.set_adapter(name)
            alone[name] = lm(x, key_padding_mask=mask)
        with lm.disable_adapters():
            alone[None] = lm(x, key_padding_mask=mask)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-6)


def test_unbatched_input_refuses_a_per_row_choice():
    lm = lorakit.get_lora_model(_make(batch_first=False), LoraConfig(r=2, target_modules=["mha"]), "a")
    with pytest.raises(RuntimeError, match="unbatched"):
        lm(torch.randn(5, 8), adapter_names=["a"] * 5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(use_dora=True), "DoraAdapter"),
    (dict(init_lora_weights="pissa"), "pissa"),
])
def test_variants_and_weight_inits_are_refused(kwargs, match):
    with pytest.raises(TargetModuleError, match=match):
        lorakit.get_lora_model(_make(), LoraConfig(r=2, target_modules=["mha"], **kwargs))


def test_separate_qkv_weights_are_refused_and_dropout_is_ignored_with_a_warning():
    with pytest.raises(TargetModuleError, match="packed q/k/v"):
        lorakit.get_lora_model(_make(kdim=4, vdim=4), LoraConfig(r=2, target_modules=["mha"]))
    with pytest.warns(UserWarning, match="lora_dropout"):
        lm = lorakit.get_lora_model(_make(), LoraConfig(r=2, lora_dropout=0.1, target_modules=["mha"]))
    assert lm.model.mha.embed_dim == 8 and lm.model.mha.batch_first  # attributes reach the base


def test_loraplus_speeds_up_both_b_factors_and_analysis_tools_refuse_the_folder(tmp_path):
    from lorakit.analysis.errors import UnsupportedAdapterError
    from lorakit.analysis.factors import read_adapter
    from lorakit.core.variants.loraplus import param_groups

    lm = lorakit.get_lora_model(_make(), LoraConfig(r=2, target_modules=["mha"]))
    ad = lm.model.mha.adapters["default"]
    fast = {id(p) for g in param_groups(lm, lr=1e-3, ratio=16) if g["lr"] == 16e-3 for p in g["params"]}
    assert fast == {id(ad.lora_b), id(ad.out_b)}
    lm.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedAdapterError, match="MultiheadAttention"):
        read_adapter(tmp_path)  # inspect/compress/combine: ΔW of out_proj isn't scaling·B·A


@pytest.mark.parametrize("targets", ["all-linear", ["out_proj", "head"]])
def test_the_inner_out_proj_is_refused_with_the_fix(targets):
    with pytest.raises(TargetModuleError, match="never calls it"):
        lorakit.get_lora_model(_make(), LoraConfig(r=2, target_modules=targets))
    lm = lorakit.get_lora_model(_make(), LoraConfig(r=2, target_modules="all-linear", exclude_modules=["out_proj"]))
    assert isinstance(lm.model.head, lorakit.core.layers.LoraLayer)
    assert lm(torch.randn(2, 3, 8)).shape == (2, 3, 3)
