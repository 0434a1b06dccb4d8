"""adapter_config.json is validated in full (types, ranges, a memory bound) before the model is
touched, and the error names the key — in the Python API, `lorakit merge` and `lorakit serve`."""

from __future__ import annotations

import json

import pytest
import torch
from factories import randomize_lora, tiny_llama

import lorakit
from lorakit.errors import AdapterLoadError
from lorakit.io.config_validation import validate_adapter_config


def _folder(tmp_path, **changes):
    model = lorakit.get_lora_model(tiny_llama(1), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


BAD = {
    "target_modules_int": ("target_modules", 5),
    "target_modules_ints": ("target_modules", [1, 2]),
    "rank_pattern_list": ("rank_pattern", [1]),
    "rank_pattern_str_value": ("rank_pattern", {"q_proj": "8"}),
    "alpha_pattern_null": ("alpha_pattern", None),
    "alpha_pattern_nan": ("alpha_pattern", {"q_proj": float("nan")}),
    "layers_to_transform_str": ("layers_to_transform", "0"),
    "layers_to_transform_negative": ("layers_to_transform", [-1]),
    "deeply_nested": ("modules_to_save", _nested(50)),
    "r_float_huge": ("r", 1e9),
    "r_int_huge": ("r", 10**9),
    "r_bool": ("r", True),
    "r_str": ("r", "8"),
    "alpha_inf": ("lora_alpha", float("inf")),
    "alpha_str": ("lora_alpha", "16"),
    "dropout_big": ("lora_dropout", 3),
    "bias_bad": ("bias", "yes"),
    "use_dora_str": ("use_dora", "true"),
    "init_list": ("init_lora_weights", [True]),
    "task_type_int": ("task_type", 3),
    "peft_type_int": ("peft_type", 7),
}


@pytest.mark.parametrize("case", list(BAD))
def test_mistyped_field_is_refused_naming_the_key(tmp_path, case):
    key, value = BAD[case]
    folder = _folder(tmp_path, **{key: value})
    base = tiny_llama(0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterLoadError) as info:
        lorakit.LoraModel.from_pretrained(base, folder)
    assert key in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_memory_bound_refuses_a_rank_far_too_large_for_the_model_before_allocating(tmp_path):
    folder = _folder(tmp_path, r=60_000)  # within MAX_RANK, but 60000·(64+64) per layer ≫ the tiny base
    with pytest.raises(AdapterLoadError, match="far too large"):
        lorakit.LoraModel.from_pretrained(tiny_llama(0), folder)


def test_validator_accepts_what_peft_and_lorakit_write(tmp_path):
    folder = _folder(tmp_path)
    validate_adapter_config(json.loads((folder / "adapter_config.json").read_text()))
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], rank_pattern={"q_proj": 4},
                          alpha_pattern={"q_proj": 8}, layers_to_transform=[0], layers_pattern="layers")
    validate_adapter_config(json.loads(json.dumps(cfg.to_dict(), default=sorted)))
