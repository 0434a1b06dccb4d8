"""DoRA: PEFT parity both ways, the closed form, magnitude init, gradients, merge, 4-bit base."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn as nn
from factories import MODELS, randomize_lora
from variant_helpers import Fake4bitLinear, logits, quantize_linears

import lorakit
from lorakit import LoraConfig
from lorakit.core.variants import DoraAdapter

CASES = {
    "llama-qv-embed": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "bert-rslora": ("bert", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "dense"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_dora_folder_loads_with_identical_outputs(case, tmp_path, input_ids):
    kind, kwargs = CASES[case]
    pm = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(use_dora=True, **kwargs))
    randomize_lora(pm)
    pm.eval().save_pretrained(tmp_path)
    ours = lorakit.LoraModel.from_pretrained(MODELS[kind](), tmp_path)
    assert torch.equal(logits(ours, input_ids), logits(pm, input_ids))  # bit for bit: same operation order


@pytest.mark.parametrize("case", sorted(CASES))
def test_our_dora_folder_loads_in_peft_with_identical_outputs(case, tmp_path, input_ids):
    kind, kwargs = CASES[case]
    ours = lorakit.get_lora_model(MODELS[kind](), LoraConfig(use_dora=True, **kwargs))
    randomize_lora(ours)
    ours.eval().save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path).eval()
    assert torch.equal(logits(pm, input_ids), logits(ours, input_ids))


def test_magnitude_starts_at_row_norms_and_output_is_unchanged(input_ids):
    model = MODELS["llama"]()
    ref = logits(model, input_ids)
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lm = lorakit.get_lora_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    adapter = lm.model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert isinstance(adapter, DoraAdapter)
    torch.testing.assert_close(adapter.lora_magnitude, weight.norm(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(logits(lm, input_ids), ref, rtol=0, atol=1e-6)


def _single_linear(bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 10, bias=bias))
    lm = lorakit.get_lora_model(net, LoraConfig(r=3, lora_alpha=6, target_modules=["0"], use_dora=True))
    randomize_lora(lm, seed=seed + 1)
    return lm, lm.model[0]


@pytest.mark.parametrize("bias", [False, True])
def test_output_matches_the_closed_form(bias):
    lm, layer = _single_linear(bias)
    ad = layer.adapters["default"]
    x = torch.randn(5, 12)
    w = layer.base.weight + ad.scaling * ad.lora_b @ ad.lora_a  # (out, in)
    expected = x @ (ad.lora_magnitude[:, None] * w / w.norm(dim=1, keepdim=True)).T
    if bias:
        expected = expected + layer.base.bias
    torch.testing.assert_close(lm(x), expected, rtol=0, atol=1e-6)


def test_norm_is_detached_and_gradients_match_peft():
    torch.manual_seed(0)
    x = torch.randn(6, 12)
    ours, layer = _single_linear(bias=True)
    torch.manual_seed(0)
    pm = peft.get_peft_model(nn.Sequential(nn.Linear(12, 10)), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0"],
                                                                              use_dora=True))
    ad = layer.adapters["default"]
    peft_layer = pm.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ad.lora_a)
        peft_layer.lora_B["default"].weight.copy_(ad.lora_b)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(ad.lora_magnitude)
    ours.train()
    pm.train()
    (ours(x) ** 2).sum().backward()
    (pm(x) ** 2).sum().backward()
    for mine, theirs in ((ad.lora_a, peft_layer.lora_A["default"].weight), (ad.lora_b, peft_layer.lora_B["default"].weight),
                         (ad.lora_magnitude, peft_layer.lora_magnitude_vector["default"].weight)):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)
    # with a detached norm, dL/dm is exactly Σ_rows (∂L/∂h) · (W'x / ‖W'‖)
    ad.lora_magnitude.grad = None
    out = ours(x)
    w = (layer.base.weight + ad.scaling * ad.lora_b @ ad.lora_a).detach()
    direction = x @ (w / w.norm(dim=1, keepdim=True)).T  # (N, out)
    out.sum().backward()
    torch.testing.assert_close(ad.lora_magnitude.grad, direction.sum(0), rtol=1e-5, atol=1e-6)


def _randomize_keeping_magnitudes(lm, seed=1):
    """Random A, B; magnitudes near their init (m ≈ 0 would make the unmerge's W / f ill-conditioned)."""
    magnitudes = {k: p.detach().clone() for k, p in lm.named_parameters() if "magnitude" in k}
    randomize_lora(lm, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in lm.named_parameters():
            if k in magnitudes:
                p.copy_(magnitudes[k] * (1 + 0.1 * torch.randn(p.shape, generator=g)))


def test_merge_unmerge_exact(input_ids):
    lm = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                              target_modules=["q_proj", "v_proj", "embed_tokens"]))
    _randomize_keeping_magnitudes(lm)
    before = {k: v.clone() for k, v in lm.model.state_dict().items() if ".base." in k}
    ref = logits(lm, input_ids)
    lm.merge_adapter()
    torch.testing.assert_close(logits(lm, input_ids), ref, rtol=0, atol=1e-5)
    lm.unmerge_adapter()
    for key, value in lm.model.state_dict().items():
        if key in before:
            torch.testing.assert_close(value, before[key], rtol=0, atol=2e-6)
    torch.testing.assert_close(logits(lm, input_ids), ref, rtol=0, atol=2e-6)
    merged = lm.merge_and_unload()
    torch.testing.assert_close(logits(merged, input_ids), ref, rtol=0, atol=1e-5)


def test_two_dora_adapters_merge_like_their_forward(input_ids):
    lm = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "a")
    lm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    _randomize_keeping_magnitudes(lm)
    lm.set_adapter(["a", "b"])
    ref = logits(lm, input_ids)
    lm.merge_adapter()
    torch.testing.assert_close(logits(lm, input_ids), ref, rtol=0, atol=1e-5)
    lm.unmerge_adapter()
    torch.testing.assert_close(logits(lm, input_ids), ref, rtol=0, atol=2e-6)


def test_conv_dora_matches_peft():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))

    x = torch.randn(2, 3, 9, 9)
    cfg = dict(r=2, lora_alpha=4, target_modules=["0", "2"], use_dora=True)
    ours = lorakit.get_lora_model(net(), LoraConfig(**cfg))
    randomize_lora(ours)
    pm = peft.get_peft_model(net(), peft.LoraConfig(**cfg))
    peft.set_peft_model_state_dict(pm, lorakit.core.state_dict.get_adapter_state_dict(ours.model, "default"))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), pm(x), rtol=0, atol=2e-6)
        ref = ours(x)
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), ref, rtol=0, atol=5e-6)


def test_dora_on_a_4bit_base_uses_the_dequantised_weight(input_ids):
    model = quantize_linears(MODELS["llama"](), ("q_proj", "v_proj"))
    lm = lorakit.get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    layer = lm.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base, Fake4bitLinear)
    ad = layer.adapters["default"]
    torch.testing.assert_close(ad.lora_magnitude, layer.base.dequantize().norm(dim=1), rtol=0, atol=0)
    randomize_lora(lm)
    x = torch.randn(3, 64)
    w = layer.base.dequantize() + ad.scaling * ad.lora_b @ ad.lora_a
    expected = x @ (ad.lora_magnitude[:, None] * w / w.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(layer(x), expected.detach(), rtol=0, atol=1e-6)
    lm.merge_adapter()  # the merged weight is exact before the base re-quantises it
    merged = (ad.lora_magnitude[:, None] * w / w.norm(dim=1, keepdim=True)).detach()
    torch.testing.assert_close(layer.base.last_target, merged, rtol=0, atol=1e-6)
