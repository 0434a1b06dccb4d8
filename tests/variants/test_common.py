"""What every variant must do: mixed batches equal each adapter alone, merge/unmerge exact, save/load
round trip, and a 4-bit base behaves as a float base holding the dequantised weight."""

from __future__ import annotations

import pytest
import torch
from factories import MODELS, randomize_lora
from variant_helpers import Fake4bitLinear, logits, quantize_linears

import lorakit
from lorakit import LoraConfig
from lorakit.core.variants import AdaLoraConfig, set_rank
from lorakit.core.variants.adalora_budget import AdaLoraController

TARGETS = ["q_proj", "v_proj"]
VARIANTS = {
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True),
    "rslora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True),
    "pissa": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"),
    "adalora": lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=TARGETS),
    "dylora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dylora=True),
    "shared_a": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, shared_a_with="plain"),
}


def _model(variant, base=None):
    """A model with a plain adapter "plain" and the variant as "v", both non-trivial."""
    lm = lorakit.get_lora_model(base if base is not None else MODELS["llama"](),
                                LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), "plain")
    lm.add_adapter("v", VARIANTS[variant]())
    magnitudes = {k: p.detach().clone() for k, p in lm.named_parameters() if "magnitude" in k}
    randomize_lora(lm)
    with torch.no_grad():
        for k, p in lm.named_parameters():
            if k in magnitudes:  # keep DoRA magnitudes near their init: a well-conditioned unmerge
                p.copy_(magnitudes[k] * 1.1)
    if variant == "adalora":  # prune a few triplets
        ctl = AdaLoraController(lm, "v")
        for path, ad in ctl.layers:
            ad.apply_mask(torch.tensor([True, False, True, True]) if "q_proj" in path else torch.ones(4, dtype=bool))
        lm.peft_config["v"].rank_pattern = ctl.rank_pattern()
    if variant == "dylora":
        set_rank(lm, 3)
    return lm


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mixed_batch_equals_each_adapter_alone(variant, input_ids):
    lm = _model(variant)
    rows = ["v", "plain", None, "v"]
    mixed = logits(lm, input_ids, adapter_names=rows)
    for i, name in enumerate(rows):
        if name is None:
            with lm.disable_adapters():
                alone = logits(lm, input_ids[i:i + 1])
        else:
            lm.set_adapter(name)
            alone = logits(lm, input_ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=0, atol=2e-6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_merge_unmerge_exact_and_save_load(variant, input_ids, tmp_path):
    lm = _model(variant)
    lm.set_adapter("v")
    ref = logits(lm, input_ids)
    weights = {k: v.clone() for k, v in lm.model.state_dict().items() if k.endswith("base.weight")}
    lm.merge_adapter()
    torch.testing.assert_close(logits(lm, input_ids), ref, rtol=0, atol=1e-5)
    lm.unmerge_adapter()
    for key, value in lm.model.state_dict().items():
        if key in weights:
            torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6)
    lm.save_pretrained(tmp_path)
    base = MODELS["llama"]()
    if variant == "shared_a":  # the owner first, so the sharing is restored
        back = lorakit.LoraModel.from_pretrained(base, tmp_path / "plain", adapter_name="plain")
        back.load_adapter(tmp_path / "v", "v")
    else:  # (PiSSA's folder re-runs the init on the original base, so it is loaded alone too)
        back = lorakit.LoraModel.from_pretrained(base, tmp_path / "v", adapter_name="v")
    back.set_adapter("v")
    if variant == "dylora":
        set_rank(back, 3)
    # exact, except where the reloaded tensors are smaller (AdaLoRA's pruned triplets: a shorter sum)
    # or re-derived (PiSSA's residual comes from a fresh SVD)
    tolerance = {"pissa": 1e-5, "adalora": 1e-6}.get(variant, 0)
    torch.testing.assert_close(logits(back, input_ids), ref, rtol=0, atol=tolerance)


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"pissa"}))  # PiSSA: see test_rslora_pissa
def test_a_4bit_base_acts_like_a_float_base_with_the_dequantised_weight(variant, input_ids):
    quantized = quantize_linears(MODELS["llama"](), ("q_proj", "v_proj"))
    dense = MODELS["llama"]()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Fake4bitLinear):
                dense.get_submodule(name).weight.copy_(module.dequantize())
    q, d = _model(variant, quantized), _model(variant, dense)
    for lm in (q, d):
        lm.set_adapter("v")
    torch.testing.assert_close(logits(q, input_ids), logits(d, input_ids), rtol=0, atol=2e-6)


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - {"pissa"}))
def test_lorakit_nf4_base_acts_like_a_float_base_with_the_dequantised_weight(variant, input_ids):
    from lorakit.quant import Linear4bit

    quantized = lorakit.quantize_model(MODELS["llama"](), "nf4", double_quant=True).eval()
    dense = MODELS["llama"]()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Linear4bit):
                dense.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    q, d = _model(variant, quantized), _model(variant, dense)
    for lm in (q, d):
        lm.set_adapter("v")
    torch.testing.assert_close(logits(q, input_ids), logits(d, input_ids), rtol=0, atol=2e-5)
