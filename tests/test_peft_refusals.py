"""PEFT features lorakit doesn't implement are refused by name, at config time and at load time.

Never a warning followed by different numbers: each case below is a real PEFT folder (or a PEFT
folder whose config sets the feature) that lorakit must refuse with AdapterLoadError naming it.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.tuners.lora.config import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig
from peft_exact import MLP

import lorakit
import lorakit.core.variants
from lorakit import AdapterLoadError, ConfigError, LoraConfig
from lorakit.core.peft_features import UNSUPPORTED_INITS, UNSUPPORTED_KEYS
from lorakit.train.config import lora_config_from

# key -> (a non-default value, the feature name the error must say)
KEY_CASES = {
    "kasa_config": ({"beta": 1e-4, "gamma": 1e-3}, "KaSA"),
    "velora_config": ({"num_groups": 64, "scale": 1.0, "init_type": "batch_average"}, "VeLoRA"),
    "monteclora_config": ({"num_samples": 8}, "MonteCLoRA"),
    "use_bdlora": ({"target_modules_bd_a": ["lin0"], "target_modules_bd_b": ["lin1"], "nblocks": 2}, "BD-LoRA"),
    "use_qalora": (True, "QA-LoRA"),
    "alora_invocation_tokens": ([1, 2], "aLoRA"),
    "arrow_config": ({"top_k": 3}, "Arrow"),
    "layer_replication": ([[0, 1]], "layer replication"),
    "megatron_config": ({"tensor_model_parallel_size": 2}, "Megatron"),
    "ensure_weight_tying": (True, "ensure_weight_tying"),
}
INIT_CASES = {"loftq": "LoftQ", "eva": "EVA", "corda": "CorDA", "lora_ga": "LoRA-GA", "mica": "MiCA"}


def test_every_unsupported_feature_has_a_case():
    assert set(KEY_CASES) == set(UNSUPPORTED_KEYS)
    assert set(INIT_CASES) == set(UNSUPPORTED_INITS)


@pytest.mark.parametrize("key", sorted(KEY_CASES))
def test_unsupported_key_refused_at_config_time(key):
    value, feature = KEY_CASES[key]
    with pytest.raises(ConfigError, match=feature):
        LoraConfig(target_modules=["lin0"], **{key: value})
    with pytest.raises(ConfigError, match=feature):
        LoraConfig.from_dict({"peft_type": "LORA", "target_modules": ["lin0"], key: value})
    with pytest.raises(ConfigError, match=feature):
        lora_config_from({"target_modules": ["lin0"], key: value})
    # the default value PEFT writes for every adapter is fine
    default = {"use_qalora": False, "ensure_weight_tying": False}.get(key)
    assert LoraConfig.from_dict({"target_modules": ["lin0"], key: default}).extra[key] == default


@pytest.mark.parametrize("init", sorted(INIT_CASES))
def test_unsupported_init_refused_at_config_time(init):
    with pytest.raises(ConfigError, match=INIT_CASES[init]):
        LoraConfig(target_modules=["lin0"], init_lora_weights=init)
    with pytest.raises(ConfigError, match=INIT_CASES[init]):
        LoraConfig.from_dict({"target_modules": ["lin0"], "init_lora_weights": init})


def _peft_folder(tmp_path, **kwargs):
    pm = peft.get_peft_model(MLP(), peft.LoraConfig(r=4, target_modules=["lin0", "lin1"], **kwargs))
    pm.save_pretrained(tmp_path)
    return tmp_path


REAL_FOLDERS = {
    "kasa": (dict(kasa_config=KasaConfig()), "KaSA"),
    "velora": (dict(velora_config=VeloraConfig()), "VeLoRA"),
    "monteclora": (dict(monteclora_config=MontecloraConfig()), "MonteCLoRA"),
    "bdlora": (dict(use_bdlora=BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"],
                                            nblocks=2)), "BD-LoRA"),
    "mica": (dict(init_lora_weights="mica"), "MiCA"),
    "qalora": (dict(use_qalora=True), "QA-LoRA"),
}


@pytest.mark.parametrize("case", sorted(REAL_FOLDERS))
def test_real_peft_folder_with_unsupported_feature_is_refused(case, tmp_path):
    kwargs, feature = REAL_FOLDERS[case]
    folder = _peft_folder(tmp_path, **kwargs)
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=feature):
        lorakit.LoraModel.from_pretrained(model, folder)
    host = lorakit.get_lora_model(MLP(), LoraConfig(target_modules=["lin2"]), "x")
    with pytest.raises(AdapterLoadError, match=feature):
        host.load_adapter(folder, "y")
    assert list(host.peft_config) == ["x"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("key", sorted(set(KEY_CASES) - {"kasa_config", "velora_config", "monteclora_config",
                                                          "use_bdlora", "use_qalora"}))
def test_peft_folder_whose_config_sets_an_unsupported_key_is_refused(key, tmp_path):
    folder = _peft_folder(tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg[key] = KEY_CASES[key][0]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match=KEY_CASES[key][1]):
        lorakit.LoraModel.from_pretrained(MLP(), folder)


@pytest.mark.parametrize("init", sorted(set(INIT_CASES) - {"mica"}))
def test_peft_folder_with_unsupported_init_is_refused(init, tmp_path):
    folder = _peft_folder(tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match=INIT_CASES[init]):
        lorakit.LoraModel.from_pretrained(MLP(), folder)


def test_tensors_without_a_place_are_refused_not_dropped(tmp_path):
    folder = _peft_folder(tmp_path, kasa_config=KasaConfig())
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["kasa_config"] = None  # hide the feature: the extra tensors alone must still stop the load
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match="lora_diag"):
        lorakit.LoraModel.from_pretrained(MLP(), folder)


@pytest.mark.parametrize("extra", [dict(use_dora=True), dict(use_dylora=True), dict(init_lora_weights="pissa"),
                                   dict(init_lora_weights="olora"), dict(init_lora_weights="orthogonal"),
                                   dict(lora_bias=True), dict(lora_dropout=0.1)])
def test_variants_on_raw_parameters_are_refused(extra):
    name = next(iter(extra)) if "init_lora_weights" not in extra else "init_lora_weights"
    with pytest.raises(ConfigError, match=f"target_parameters.*{name}"):
        LoraConfig(target_parameters=["rnn.weight_ih_l0"], **extra)


def test_lora_bias_needs_plain_lora():
    with pytest.raises(ConfigError, match="lora_bias"):
        LoraConfig(target_modules=["lin0"], lora_bias=True, use_dora=True)
    with pytest.raises(ConfigError, match="lora_bias"):
        LoraConfig(target_modules=["lin0"], lora_bias=True, init_lora_weights="pissa")
    with pytest.raises(ConfigError, match="lora_bias.*ADALORA"):
        lorakit.core.variants.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["lin0"], lora_bias=True)


@pytest.mark.parametrize("bad", [[1, 1], {"embed_tokens": [2, -1]}, "1,2", [1.5]])
def test_bad_trainable_token_indices_are_config_errors(bad):
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        LoraConfig(target_modules=["q_proj"], trainable_token_indices=bad)


def test_a_saved_base_embedding_that_differs_is_refused(tmp_path):
    from factories import tiny_llama
    from safetensors.torch import load_file, save_file

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    pm.save_pretrained(tmp_path)  # PEFT adds the base embedding (save_embedding_layers)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in tensors
    lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path)  # equal to the model's: fine
    tensors[key] = tensors[key] + 1
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="embed_tokens.base_layer.weight"):
        lorakit.LoraModel.from_pretrained(tiny_llama(), tmp_path)
