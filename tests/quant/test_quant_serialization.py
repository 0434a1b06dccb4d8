"""4-bit checkpoints move between lorakit and bitsandbytes / transformers in both directions."""

import json

import pytest
import torch
import torch.nn as nn
from quant_helpers import bnb_dequant_checked, closed_form_dequant, make_linear, tiny_llama

from lorakit.quant import (
    Linear4bit,
    QuantState,
    dequantize_4bit,
    load_quantized,
    quantization_config,
    quantize_4bit,
    quantize_model,
    save_quantized,
)

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_entries_equal_bnb_and_load_both_ways(bnbf, quant_type, double_quant):
    weight = torch.randn(48, 80, dtype=torch.bfloat16)
    ref_packed, ref_state = bnbf.quantize_4bit(
        weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant
    )
    packed, state = quantize_4bit(weight, 64, double_quant, quant_type)
    ours, theirs = state.as_dict(packed=True), ref_state.as_dict(packed=True)
    assert ours.keys() == theirs.keys()
    for key in ours:  # the JSON blob too, byte for byte
        assert torch.equal(ours[key], theirs[key]), key
    # the closed form of bnb's own bytes and scales (bnb's CPU kernel is wrong on some CPUs)
    ref = bnb_dequant_checked(bnbf, ref_packed, ref_state, quant_type)

    from_bnb = QuantState.from_dict({"weight." + k: v for k, v in theirs.items()})
    assert torch.equal(dequantize_4bit(ref_packed, from_bnb), ref)
    to_bnb = bnbf.QuantState.from_dict(dict(ours), device=torch.device("cpu"))
    assert torch.equal(bnb_dequant_checked(bnbf, packed, to_bnb, quant_type), ref)


def test_unpacked_dict_and_bad_entries():
    _, state = quantize_4bit(torch.randn(8, 64))
    plain = state.as_dict(packed=False)
    assert plain["quant_type"] == "nf4" and plain["shape"] == [8, 64] and plain["nested_blocksize"] == 256
    assert torch.equal(QuantState.from_dict(plain).absmax, state.absmax)
    packed_dict = state.as_dict(packed=True)
    with pytest.raises(ValueError, match="missing"):
        QuantState.from_dict({"absmax": state.absmax})
    twice = {**packed_dict, "x.quant_state.bitsandbytes__fp4": packed_dict["quant_state.bitsandbytes__nf4"]}
    with pytest.raises(ValueError, match="exactly one"):
        QuantState.from_dict(twice)
    wrong = {k: v for k, v in packed_dict.items() if k != "absmax"} | {"absmax": state.absmax[:1]}
    with pytest.raises(ValueError, match="another tensor"):
        QuantState.from_dict(wrong)


def test_linear4bit_loads_a_bitsandbytes_layer_and_back():
    bnn = pytest.importorskip("bitsandbytes.nn")
    import bitsandbytes.functional as bnbf

    linear = make_linear(128, 48)
    ref = bnn.Linear4bit(128, 48, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    ref.load_state_dict(linear.state_dict())
    ref = ref.to("cpu")
    expected = bnb_dequant_checked(bnbf, ref.weight.data, ref.weight.quant_state, "nf4")

    ours = Linear4bit.from_linear(make_linear(128, 48, seed=3))
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours.dequantize(), expected)

    sd = Linear4bit.from_linear(linear).state_dict()
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    param = bnn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu")
    assert torch.equal(bnb_dequant_checked(bnbf, param.data, param.quant_state, "nf4"), expected)


def test_save_and_load_quantized_round_trip(tmp_path):
    model = quantize_model(tiny_llama(), compute_dtype=torch.float32)
    with torch.no_grad():
        ref = model(IDS).logits
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True
    assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"]) == ("nf4", True)
    assert qc["bnb_4bit_compute_dtype"] == "float32" and qc["llm_int8_skip_modules"] == ["lm_head"]
    assert quantization_config(model) == qc

    from safetensors import safe_open

    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as fh:
        keys = set(fh.keys())
    prefix = "model.layers.1.self_attn.v_proj.weight"
    assert {prefix, prefix + ".absmax", prefix + ".quant_state.bitsandbytes__nf4"} <= keys

    loaded = load_quantized(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.up_proj, Linear4bit)
    assert type(loaded.lm_head) is nn.Linear
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, ref)

    with pytest.raises(FileExistsError, match="overwrite"):
        save_quantized(model, tmp_path / "q")
    save_quantized(model, tmp_path / "q", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no staging folder left behind
    with pytest.raises(ValueError, match="no Linear4bit"):
        save_quantized(tiny_llama(), tmp_path / "plain")


def test_transformers_bitsandbytes_and_lorakit_read_each_other(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = tiny_llama()
    base.save_pretrained(tmp_path / "fp")
    ours = quantize_model(base, compute_dtype=torch.float32)
    save_quantized(ours, tmp_path / "ours")
    with torch.no_grad():
        ref = ours(IDS).logits

    # Verdicts compare weights, not bnb's forward: its CPU 4-bit kernels are wrong for some shapes
    # on some CPUs (BENCHMARKS.md), and no verdict may depend on which kernel a CPU gets.
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert type(theirs.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    assert_same_4bit_weights(theirs, ours)

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    bnb_model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp", quantization_config=config, device_map="cpu"
    )
    assert_same_4bit_weights(bnb_model, ours)  # they quantise exactly as we do
    bnb_model.save_pretrained(tmp_path / "theirs")
    loaded = load_quantized(tmp_path / "theirs")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, ref)


def assert_same_4bit_weights(bnb_model, ours):
    """Every bnb 4-bit layer holds our packed bytes and dequantises (closed form) to our weight."""
    theirs = dict(bnb_model.named_modules())
    checked = 0
    for name, module in ours.named_modules():
        if isinstance(module, Linear4bit):
            param = theirs[name].weight
            assert torch.equal(param.data.view(-1), module.weight.view(-1)), name
            expected = module.dequantize()
            assert torch.equal(closed_form_dequant(param.data, param.quant_state).to(expected.dtype), expected)
            checked += 1
    assert checked == 14  # 7 projections x 2 layers
