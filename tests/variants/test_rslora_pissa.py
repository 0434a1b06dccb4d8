"""rsLoRA (α/√r) and PiSSA init: closed forms and PEFT parity."""

from __future__ import annotations

import math

import peft
import pytest
import torch
import torch.nn as nn
from factories import MODELS, randomize_lora
from variant_helpers import logits, quantize_linears

import lorakit
from lorakit import ConfigError, LoraConfig
from lorakit.core.variants.pissa import to_lora_factors


# ---------------------------------------------------------------------- rsLoRA
def test_rslora_scaling_and_output_closed_form():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8))
    lm = lorakit.get_lora_model(net, LoraConfig(r=9, lora_alpha=6, use_rslora=True, target_modules=["0"]))
    randomize_lora(lm)
    layer = lm.model[0]
    ad = layer.adapters["default"]
    assert ad.scaling == 6 / math.sqrt(9) == 2.0
    x = torch.randn(4, 16)
    expected = layer.base(x) + 2.0 * x @ ad.lora_a.T @ ad.lora_b.T
    torch.testing.assert_close(lm(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("direction", ["ours->peft", "peft->ours"])
def test_rslora_with_rank_pattern_matches_peft(direction, tmp_path, input_ids):
    kwargs = dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                  rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 4})
    if direction == "ours->peft":
        src = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(**kwargs))
        randomize_lora(src)
        src.save_pretrained(tmp_path)
        dst = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path)
    else:
        src = peft.get_peft_model(MODELS["llama"](), peft.LoraConfig(**kwargs))
        randomize_lora(src)
        src.save_pretrained(tmp_path)
        dst = lorakit.LoraModel.from_pretrained(MODELS["llama"](), tmp_path)
    assert torch.equal(logits(src.eval(), input_ids), logits(dst.eval(), input_ids))


# ---------------------------------------------------------------------- PiSSA
def _qv(model):
    return [model.get_submodule(p) for p in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj")]


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_pissa_keeps_the_output_and_residual_plus_adapter_is_w0(init, kind, input_ids):
    model = MODELS[kind]()
    ref = logits(model, input_ids)
    targets = ["q_proj", "v_proj"] if kind == "llama" else ["c_attn"]
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.split(".")[-1] in targets}
    lm = lorakit.get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                  fan_in_fan_out=kind == "gpt2", init_lora_weights=init))
    torch.testing.assert_close(logits(lm, input_ids), ref, rtol=0, atol=2e-5)
    for layer in lm.lora_layers():
        path = next(n for n, m in lm.model.named_modules() if m is layer)
        torch.testing.assert_close(layer.base.weight + layer.delta_weight("default"), originals[path], rtol=0,
                                   atol=1e-6)


def test_pissa_is_the_top_r_svd_and_matches_peft_init():
    ours = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights="pissa"))
    pm = peft.get_peft_model(MODELS["llama"](), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights="pissa"))
    w0 = MODELS["llama"]().model.layers[0].self_attn.q_proj.weight.detach()
    u, s, vh = torch.linalg.svd(w0)
    top = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    layer = ours.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.delta_weight("default"), top, rtol=0, atol=1e-5)
    for mine, theirs in zip(_qv(ours.model), _qv(pm.base_model.model)):
        ad = mine.adapters["default"]
        pa, pb = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
        # the same SVD: factors equal up to the sign of each singular pair; products equal
        torch.testing.assert_close((ad.lora_b @ ad.lora_a), pb @ pa, rtol=0, atol=1e-6)
        torch.testing.assert_close(ad.lora_a.abs(), pa.abs(), rtol=0, atol=1e-5)
        torch.testing.assert_close(mine.base.weight, theirs.base_layer.weight, rtol=0, atol=1e-6)


def test_pissa_folder_round_trips_with_peft(tmp_path, input_ids):
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    ours = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(**cfg))
    randomize_lora(ours)  # "trained"
    ours.save_pretrained(tmp_path / "ours")
    # PEFT re-runs the PiSSA init on the original base when it loads the folder, as we do
    pm = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path / "ours")
    torch.testing.assert_close(logits(pm, input_ids), logits(ours, input_ids), rtol=0, atol=1e-5)
    pm.save_pretrained(tmp_path / "peft")
    back = lorakit.LoraModel.from_pretrained(MODELS["llama"](), tmp_path / "peft")
    torch.testing.assert_close(logits(back, input_ids), logits(ours, input_ids), rtol=0, atol=1e-5)


def test_pissa_converts_to_a_plain_rank_2r_lora_on_the_original_base(input_ids):
    ours = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                init_lora_weights="pissa_niter_2"))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # "training"
    plain = lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))
    with torch.no_grad():
        for mine, target in zip(ours.lora_layers(), plain.lora_layers()):
            a, b = to_lora_factors(mine.adapters["default"])
            target.adapters["default"].lora_a.copy_(a)
            target.adapters["default"].lora_b.copy_(b)
    torch.testing.assert_close(logits(plain, input_ids), logits(ours, input_ids), rtol=0, atol=2e-5)


def test_pissa_niter_recovers_a_low_rank_weight():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(30, 3) @ torch.randn(3, 40))  # rank 3
    w0 = net[0].weight.detach().clone()
    lm = lorakit.get_lora_model(net, LoraConfig(r=3, lora_alpha=3, target_modules=["0"], init_lora_weights="pissa_niter_2"))
    torch.testing.assert_close(lm.model[0].delta_weight("default"), w0, rtol=0, atol=1e-4)
    assert lm.model[0].base.weight.abs().max() < 1e-4  # nothing left in the residual


def test_pissa_on_a_4bit_base_writes_the_dequantised_residual():
    model = quantize_linears(MODELS["llama"](), ("q_proj",))
    layer0 = model.model.layers[0].self_attn.q_proj
    w_deq = layer0.dequantize().clone()
    lm = lorakit.get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"))
    layer = lm.model.model.layers[0].self_attn.q_proj
    ad = layer.adapters["default"]
    torch.testing.assert_close(layer.base.last_target, w_deq - ad.scaling * ad.lora_b @ ad.lora_a, rtol=0, atol=1e-6)


def test_pissa_on_a_lorakit_nf4_base_requantises_the_residual():
    model = lorakit.quantize_model(MODELS["llama"](), "nf4").eval()
    w_deq = model.model.layers[0].self_attn.q_proj.dequantize(torch.float32).clone()
    lm = lorakit.get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa"))
    layer = lm.model.model.layers[0].self_attn.q_proj
    ad = layer.adapters["default"]
    residual = w_deq - ad.scaling * ad.lora_b.detach() @ ad.lora_a.detach()
    error = (layer.base.dequantize(torch.float32) - residual).norm() / residual.norm()
    assert error < 0.12  # one NF4 rounding of the residual (≈ 0.09 relative RMS on real weights)


def test_pissa_rejects_ranks_beyond_the_weight_and_non_linear_layers():
    with pytest.raises(ConfigError, match="exceeds"):
        lorakit.get_lora_model(nn.Sequential(nn.Linear(4, 3)), LoraConfig(r=4, target_modules=["0"],
                                                                           init_lora_weights="pissa"))
    with pytest.raises(lorakit.TargetModuleError, match="Linear-like"):
        lorakit.get_lora_model(MODELS["llama"](), LoraConfig(r=2, target_modules=["embed_tokens"],
                                                              init_lora_weights="pissa"))
    with pytest.raises(ConfigError):
        LoraConfig(r=2, target_modules=["q"], init_lora_weights="pissa_niter_x")
