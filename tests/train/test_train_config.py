"""The train config: validation messages, --set overrides, generated help. No model is loaded here."""

from __future__ import annotations

import dataclasses

import pytest

from lorakit.core.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig, describe_keys, load_config

BASE = {"data": {"train_file": "x.jsonl"}}


def error_for(raw: dict, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(raw=raw, overrides=list(overrides))
    return str(info.value)


def test_defaults_and_overrides_parse_values_as_yaml():
    cfg = load_config(raw=BASE, overrides=["train.lr=1e-4", "lora.target_modules=[q_proj, v_proj]",
                                           "train.max_grad_norm=null", "data.packing=true"])
    assert cfg.train.lr == 1e-4
    assert cfg.lora["target_modules"] == ["q_proj", "v_proj"]
    assert cfg.train.max_grad_norm is None
    assert cfg.data.packing is True
    assert cfg.task == "causal_lm"
    assert cfg.lora_config().task_type == "CAUSAL_LM"


def test_unknown_key_names_key_and_allowed_keys():
    msg = error_for(BASE, "train.learnin_rat=0.1")
    assert "train.learnin_rat (got 0.1): unknown key; allowed here: output_dir, seed," in msg  # nothing close
    assert "config.trian" not in error_for(BASE, "trian.lr=1")
    assert "trian (got {'lr': 1}): unknown key (did you mean 'train'?); allowed here: model, quant, lora, data, " \
        "train" in error_for(BASE, "trian.lr=1")


@pytest.mark.parametrize("typo, meant", [
    ("train.max_step=3", "max_steps"), ("train.LR=1", "lr"), ("data.train_files=x", "train_file"),
    ("train.learning_rate=0.1", "lr"),  # transformers' name
    ("train.gradient_accumulation_steps=2", "grad_accum"), ("modle.name_or_path=x", "model"),
])
def test_a_typo_in_a_key_says_did_you_mean(typo, meant):
    key = typo.partition("=")[0].removesuffix(".name_or_path")  # a mistyped section is reported as such
    assert f"{key} (got " in error_for(BASE, typo)
    assert f"unknown key (did you mean {meant!r}?); allowed here:" in error_for(BASE, typo)


def test_a_typo_in_a_lora_key_says_did_you_mean():
    msg = error_for(BASE, "lora.lora_aplha=16")
    assert "lora.lora_aplha is not a LoraConfig field (did you mean 'lora_alpha'?); allowed: alpha_pattern," in msg
    assert "(did you mean 'r'?)" in error_for(BASE, "lora.rank=8")
    assert "AdaLoraConfig field (did you mean 'total_step'?)" in \
        error_for(BASE, "lora.peft_type=ADALORA", "lora.total_steps=10")


def test_broken_yaml_names_file_line_and_column_in_one_line(tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("model:\n  name_or_path: tiny-llama\ndata:\n  train_file: data: x.jsonl\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    msg = str(info.value)
    assert msg.startswith(f"{cfg}, line 4, column 19: invalid YAML: mapping values are not allowed here")
    assert "\n" not in msg
    cfg.write_text("train: {lr: [1, 2}\n")
    with pytest.raises(ConfigError, match=r"broken.yaml, line 1, column 18: invalid YAML: expected ',' or ']'"):
        load_config(cfg)


def test_adalora_total_step_defaults_to_the_number_of_steps():
    ada = {**BASE, "lora": {"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 2,
                            "target_modules": "all-linear"}}
    cfg = load_config(raw=ada, overrides=["train.max_steps=30"])
    assert cfg.lora_config().total_step == 30
    assert cfg.resolved()["lora"]["total_step"] == 30
    assert load_config(raw=ada, overrides=["lora.total_step=12"]).lora_config().total_step == 12  # given: kept
    # by epochs: known once the data is read; the Trainer sets it
    cfg = load_config(raw=ada)
    with pytest.raises(ConfigError, match="set train.max_steps or lora.total_step"):
        cfg.lora_config()
    cfg.set_total_steps(17)
    assert cfg.lora_config().total_step == 17
    # the schedule is still checked against max_steps, naming where total_step came from
    assert "leave no budgeting phase" in error_for(ada, "train.max_steps=4")
    assert "(lora.total_step is not set, so it is the run's 4 steps: set it, or adjust tinit/tfinal)" in \
        error_for(ada, "train.max_steps=4")


def test_wrong_type_and_out_of_range_name_key_value_and_rule():
    assert "train.lr (got 'fast'): Input should be a valid number" in error_for(BASE, "train.lr=fast")
    assert "train.batch_size (got 0): Input should be greater than or equal to 1" in \
        error_for(BASE, "train.batch_size=0")
    assert "train.schedule (got 'step'): Input should be 'cosine', 'linear' or 'constant'" in \
        error_for(BASE, "train.schedule=step")
    assert "data: required key is missing" in error_for({})
    assert "data.train_file: required key is missing" in error_for({"data": {}})
    assert "set warmup_steps or warmup_ratio, not both" in error_for(BASE, "train.warmup_steps=3",
                                                                       "train.warmup_ratio=0.1")


def test_lora_section_is_the_loraconfig_fields():
    msg = error_for(BASE, "lora.qqq=8")
    assert "lora.qqq is not a LoraConfig field; allowed: alpha_pattern, base_model_name_or_path, bias," in msg
    assert "lora (got {'r': 0}): r must be a positive integer (the LoRA rank), got 0" in error_for(BASE, "lora.r=0")
    cfg = load_config(raw=BASE, overrides=["lora.use_rslora=true", "lora.r=4", "lora.target_modules=all-linear"])
    assert cfg.lora_config().use_rslora is True
    assert cfg.lora_config().scaling_for("x") == 8 / 4**0.5  # LoraConfig's default alpha (8), rsLoRA α/√r
    assert cfg.lora == {"use_rslora": True, "r": 4, "target_modules": "all-linear"}


def test_bad_set_syntax():
    assert "--set expects key=value" in error_for(BASE, "train.lr")


def test_help_lists_every_key():
    text = describe_keys()
    for section, field in TrainConfig.model_fields.items():
        sub = field.annotation
        if section == "lora":
            names = [f.name for f in dataclasses.fields(LoraConfig)
                     if f.name not in ("extra", "inference_mode", "revision", "base_model_name_or_path")]
        else:
            names = list(sub.model_fields)
        for name in names:
            assert f"  {section}.{name} (" in text, f"{section}.{name} missing from --help"
    assert "LoRA+: the B factors (*.lora_b) learn at lr × ratio" in text
    assert "lora.r (int; default 8)" in text and "rank of the update" in text


def test_resolved_config_is_complete_and_round_trips(tmp_path):
    cfg = load_config(raw={"data": {"train_file": "builtin:word-sentiment"}, "lora": {"r": 4, "target_modules": "all-linear"}})
    resolved = cfg.resolved()
    assert cfg.task == "classification"
    assert resolved["lora"]["task_type"] == "SEQ_CLS" and resolved["lora"]["r"] == 4
    assert resolved["train"]["keep_last"] == 3
    again = load_config(raw={**resolved, "lora": {k: v for k, v in resolved["lora"].items()}})
    assert again.resolved() == resolved


def test_yaml_file_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml, line 2, column 1: invalid YAML"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_example_configs_are_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
    assert len(examples) >= 4
    for path in examples:
        load_config(path)


def test_adalora_schedule_too_long_for_the_computed_steps_says_where_total_step_came_from():
    cfg = load_config(raw={**BASE, "lora": {"peft_type": "ADALORA", "tinit": 5, "tfinal": 5,
                                            "target_modules": "all-linear"}})  # steps from epochs: unknown yet
    cfg.set_total_steps(8)
    with pytest.raises(ConfigError, match=r"total_step=8 leave no budgeting phase.*it is the run's 8 steps"):
        cfg.lora_config()
