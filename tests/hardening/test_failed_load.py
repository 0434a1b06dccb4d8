"""README promise: "a failed load leaves the model exactly as it was" — for every variant.

Each case saves a working adapter, breaks its folder in one way (a missing tensor, a wrong shape,
a rank PiSSA rejects on one layer, NaN weights, an infinite alpha, integer tensors), loads it
into a model that already holds an adapter, and compares every tensor bit for bit, every
requires_grad flag, the module tree and the active adapters with a snapshot taken before.
"""

from __future__ import annotations

import json

import pytest
import torch
from factories import randomize_lora, tiny_llama
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import LorakitError

VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
    "pissa": dict(init_lora_weights="pissa"),
    "pissa_niter": dict(init_lora_weights="pissa_niter_2"),
    "dylora": dict(use_dylora=True),
    "adalora": dict(peft_type="ADALORA"),
}


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "active": list(model.active_adapters) if isinstance(model, lorakit.LoraModel) else None,
        "adapters": sorted(model.peft_config) if isinstance(model, lorakit.LoraModel) else None,
    }


def assert_same(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"]
    assert after["adapters"] == before["adapters"]
    assert after["active"] == before["active"]
    assert after["grad"] == before["grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), f"{key} changed"  # bit for bit


def saved_adapter(tmp_path, variant: str, seed: int = 3):
    if variant == "adalora":
        from lorakit.core.variants import AdaLoraConfig

        cfg = AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    else:
        cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **VARIANTS[variant])
    model = lorakit.get_lora_model(tiny_llama(seed), cfg)
    randomize_lora(model, seed)
    folder = tmp_path / f"{variant}-ok"
    model.save_pretrained(folder)
    return folder


def host_model():
    model = lorakit.get_lora_model(tiny_llama(0), lorakit.LoraConfig(r=2, target_modules=["k_proj"]))
    randomize_lora(model, 7)
    return model


def _rewrite(folder, out, config_change=None, tensor_change=None):
    out.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    if config_change:
        config_change(config)
    (out / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "adapter_model.safetensors")
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def _drop_last(t):
    t.pop(sorted(t)[-1])


def _bad_shape(t):
    key = sorted(t)[0]
    t[key] = torch.zeros(t[key].shape[0] + 1, *t[key].shape[1:])


def _nan(t):
    key = sorted(k for k in t if "lora_B" in k)[0]
    t[key] = t[key].clone()
    t[key][0, 0] = float("nan")


def _as_int(t):
    key = sorted(t)[0]
    t[key] = t[key].to(torch.int32)


def _huge_alpha(c):
    c["lora_alpha"] = 1e308 * 10  # inf after JSON round trip? json writes Infinity


def _pissa_rank_too_big_for_one_layer(c):
    c["rank_pattern"] = {"v_proj": 40}  # v_proj is 64 -> 32 (GQA): rank 40 > 32 fails on v_proj only


BREAKS = {
    "missing_tensor": dict(tensor_change=_drop_last),
    "wrong_shape": dict(tensor_change=_bad_shape),
    "nan_weights": dict(tensor_change=_nan),
    "int_tensor": dict(tensor_change=_as_int),
    "infinite_alpha": dict(config_change=_huge_alpha),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("how", list(BREAKS))
def test_failed_load_leaves_model_unchanged(tmp_path, variant, how):
    folder = _rewrite(saved_adapter(tmp_path, variant), tmp_path / "broken", **BREAKS[how])
    model = host_model()
    before = snapshot(model)
    with pytest.raises(LorakitError):
        model.load_adapter(folder, adapter_name="x")
    assert_same(before, snapshot(model))


def test_failed_pissa_load_rank_rejected_on_one_layer_leaves_base_unchanged(tmp_path):
    folder = _rewrite(saved_adapter(tmp_path, "pissa"), tmp_path / "broken",
                      config_change=_pissa_rank_too_big_for_one_layer)
    model = host_model()
    before = snapshot(model)
    with pytest.raises(LorakitError):
        model.load_adapter(folder, adapter_name="x")
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("variant", ["pissa", "pissa_niter"])
def test_pissa_load_then_delete_restores_base_bit_for_bit(tmp_path, variant):
    folder = saved_adapter(tmp_path, variant)
    model = host_model()
    before = snapshot(model)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    base_logits = model(ids).logits
    model.load_adapter(folder, adapter_name="p")
    assert not torch.equal(model.model.model.layers[0].self_attn.q_proj.base.weight,
                           before["tensors"]["model.model.layers.0.self_attn.q_proj.weight"])
    model.delete_adapter("p")
    assert_same(before, snapshot(model))
    assert torch.equal(model(ids).logits, base_logits)


def test_failed_from_pretrained_restores_requires_grad(tmp_path):
    folder = _rewrite(saved_adapter(tmp_path, "lora"), tmp_path / "broken", tensor_change=_drop_last)
    base = tiny_llama(0)
    base.model.layers[0].mlp.down_proj.weight.requires_grad_(False)  # a user's own choice stays too
    before = snapshot(base)
    with pytest.raises(LorakitError):
        lorakit.LoraModel.from_pretrained(base, folder)
    assert_same(before, snapshot(base))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_non_float_adapter_tensors_are_refused(tmp_path, dtype):
    def change(t):
        key = sorted(t)[0]
        t[key] = t[key].to(dtype)

    folder = _rewrite(saved_adapter(tmp_path, "lora"), tmp_path / "broken", tensor_change=change)
    with pytest.raises(LorakitError, match="dtype"):
        lorakit.LoraModel.from_pretrained(tiny_llama(0), folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_refused_in_python_api(tmp_path, value):
    def change(t):
        key = sorted(k for k in t if "lora_A" in k)[0]
        t[key] = t[key].clone()
        t[key][0, 0] = value

    folder = _rewrite(saved_adapter(tmp_path, "lora"), tmp_path / "broken", tensor_change=change)
    with pytest.raises(LorakitError, match="NaN|inf"):
        lorakit.LoraModel.from_pretrained(tiny_llama(0), folder)


@pytest.mark.parametrize("alpha", ["Infinity", "NaN", "1e999"])
def test_non_finite_alpha_refused_in_python_api(tmp_path, alpha):
    folder = saved_adapter(tmp_path, "lora")
    text = (folder / "adapter_config.json").read_text()
    config = json.loads(text)
    config["lora_alpha"] = 16
    text = json.dumps(config).replace('"lora_alpha": 16', f'"lora_alpha": {alpha}')
    (folder / "adapter_config.json").write_text(text)
    with pytest.raises(LorakitError, match="lora_alpha"):
        lorakit.LoraModel.from_pretrained(tiny_llama(0), folder)


def test_pissa_on_a_4bit_base_delete_restores_the_packed_weights_bit_for_bit(tmp_path):
    import warnings

    plain = tiny_llama(0)
    base = lorakit.quantize_model(plain, "nf4", double_quant=True) or plain
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = lorakit.get_lora_model(base, lorakit.LoraConfig(r=2, target_modules=["k_proj"]))
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the requantisation warning
        model.add_adapter("p", lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    assert not torch.equal(model.state_dict()["model.model.layers.0.self_attn.q_proj.base.weight"],
                           before["tensors"]["model.model.layers.0.self_attn.q_proj.weight"])
    model.delete_adapter("p")
    assert_same(before, snapshot(model))
