"""Failed loads and deletes for the newer PEFT features leave the model exactly as it was.

The hardening suite (test_failed_load.py) covers the LoRA variants on a Llama; this covers the
features merged beside it: trainable tokens, lora_bias, OLoRA, target_parameters, LoRA on
nn.MultiheadAttention, grouped convolutions and AdaLoRA on a Conv layer. Each case saves a working
adapter, breaks the folder (one tensor missing, or one tensor of the wrong shape), loads it into a
model that already holds an adapter and compares every tensor bit for bit, every requires_grad
flag, the module tree and the active adapters with a snapshot taken before. A good load followed
by delete_adapter must come back to the same snapshot too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from factories import randomize_lora, tiny_llama
from peft_exact import MLP
from test_failed_load import _bad_shape, _rewrite, assert_same, snapshot

import lorakit
from lorakit.errors import LorakitError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "peft_zoo"))
from zoo_models import Conv2dGroups, Mha, _ConvNet  # noqa: E402


def conv_net():
    return _ConvNet(torch.nn.Conv2d(1, 4, 3), (1, 4, 4), 4 * 2 * 2)


def _adalora_conv():
    from lorakit.core.variants import AdaLoraConfig

    return AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["conv2d"])


# name: (base builder, the adapter's config, the host adapter already loaded)
CASES = {
    "trainable_tokens": (tiny_llama, dict(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 5, 9]),
                         dict(r=2, target_modules=["k_proj"])),
    "trainable_tokens_only": (lambda: tiny_llama(tie_word_embeddings=True),
                              dict(r=4, target_modules=["v_proj"], trainable_token_indices=[0, 3]),
                              dict(r=2, target_modules=["k_proj"])),
    "lora_bias": (lambda: tiny_llama(attention_bias=True), dict(r=4, target_modules=["q_proj", "v_proj"],
                                                                lora_bias=True), dict(r=2, target_modules=["k_proj"])),
    "olora": (tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="olora"),
              dict(r=2, target_modules=["k_proj"])),
    "target_parameters": (MLP, dict(r=2, target_modules=["lin0"], target_parameters=["lin1.weight"]),
                          dict(r=2, target_modules=["lin2"])),
    "mha": (Mha, dict(r=2, target_modules=["mha"]), dict(r=2, target_modules=["lin0"])),
    "grouped_conv": (Conv2dGroups, dict(r=8, target_modules=["conv2d", "lin0"]), dict(r=2, target_modules=["lin1"])),
    "adalora_conv": (conv_net, "adalora", dict(r=2, target_modules=["lin0"])),
    "modules_to_save": (MLP, dict(r=2, target_modules=["lin0"], modules_to_save=["lin2"]),
                        dict(r=2, target_modules=["lin1"])),
    "bias_all": (MLP, dict(r=2, target_modules=["lin0"], bias="all"), dict(r=2, target_modules=["lin2"])),
    "bias_lora_only": (MLP, dict(r=2, target_modules=["lin0", "lin1"], bias="lora_only"),
                       dict(r=2, target_modules=["lin2"])),
}


def _drop_last_non_bias(t):  # a base bias the file lacks keeps the base's value (PEFT's rule): not a break
    t.pop(sorted(k for k in t if not k.endswith(".bias") or ".lora_B." in k)[-1])


BREAKS = {"missing_tensor": _drop_last_non_bias, "wrong_shape": _bad_shape}
# bias="all"/"lora_only" train the base model's own biases (PEFT's semantics): deleting the adapter
# leaves them, so those two are only in the failed-load test
NO_BASE_CHANGE = [c for c in CASES if not c.startswith("bias_")]


def _config(spec):
    return _adalora_conv() if spec == "adalora" else lorakit.LoraConfig(**spec)


def saved(tmp_path, case: str) -> Path:
    make, spec, _ = CASES[case]
    model = lorakit.get_lora_model(make(), _config(spec))
    randomize_lora(model, 3)
    with torch.no_grad():  # trainable-token deltas and lora_B biases are not "lora_" factors: set them too
        for name, p in model.named_parameters():
            if p.requires_grad and not name.count("lora_"):
                p.add_(0.05)
    folder = tmp_path / f"{case}-ok"
    model.save_pretrained(folder)
    return folder


def host(case: str) -> lorakit.LoraModel:
    make, _, host_spec = CASES[case]
    model = lorakit.get_lora_model(make(), lorakit.LoraConfig(**host_spec))
    randomize_lora(model, 7)
    return model


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("how", list(BREAKS))
def test_failed_load_of_a_feature_leaves_the_model_unchanged(tmp_path, case, how):
    folder = _rewrite(saved(tmp_path, case), tmp_path / "broken", tensor_change=BREAKS[how])
    model = host(case)
    before = snapshot(model)
    with pytest.raises(LorakitError):
        model.load_adapter(folder, adapter_name="x")
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("case", NO_BASE_CHANGE)
def test_delete_after_a_good_load_restores_the_model(tmp_path, case):
    folder = saved(tmp_path, case)
    model = host(case)
    before = snapshot(model)
    model.load_adapter(folder, adapter_name="x")
    model.delete_adapter("x")
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_adapter_loads_beside_an_adapter_that_wraps_a_biased_layer(tmp_path, bias):
    """The file names lin2's bias ``lin2.bias`` (saved alone); the host has it at
    ``lin2.base_layer.bias`` because its own adapter wraps lin2. It was refused as "no place for"."""
    targets = ["lin0", "lin2"] if bias == "lora_only" else ["lin0"]
    model = lorakit.get_lora_model(MLP(), lorakit.LoraConfig(r=2, target_modules=targets, bias=bias))
    randomize_lora(model, 3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") and p.requires_grad:  # trained: saved with the adapter
                p.add_(0.25)
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    want = model(x)
    model.save_pretrained(tmp_path / "a")
    hosted = host_mlp_with_lin2_wrapped()
    hosted.load_adapter(tmp_path / "a", adapter_name="x")
    hosted.set_adapter("x")
    torch.testing.assert_close(hosted(x), want, rtol=0, atol=0)


def host_mlp_with_lin2_wrapped() -> lorakit.LoraModel:
    return lorakit.get_lora_model(MLP(), lorakit.LoraConfig(r=2, target_modules=["lin2"]))
