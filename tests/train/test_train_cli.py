"""`lorakit train --help`, config errors before any model loads, classification + `lorakit predict`."""

from __future__ import annotations

import json

import pytest
import yaml

from lorakit.cli import main
from lorakit.core.config import LoraConfig


def test_train_help_documents_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "CONFIG KEYS" in out and "--resume" in out and "--set KEY=VALUE" in out
    for key in ("model.name_or_path", "quant.method", "data.on_bad_record", "train.loraplus_lr_ratio",
                "train.keep_last", "lora.target_modules", "lora.use_rslora"):
        assert f"  {key} (" in out
    assert "lora.use_dora" in out and len(LoraConfig.__dataclass_fields__) > 15


def test_config_error_exits_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import lorakit.train.model_setup as model_setup

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for an invalid config")

    monkeypatch.setattr(model_setup, "load_base", no_model)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"train_file": "x.jsonl"}, "train": {"epochs": -1}}))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.epochs (got -1): Input should be greater than 0" in err
    # a data error also comes before the model
    assert main(["train", str(cfg), "--set", "train.epochs=1"]) == 1
    assert "data file x.jsonl does not exist" in capsys.readouterr().err


def test_classification_run_and_predict(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    rows = [{"text": w, "label": lab} for w, lab in [("great", "pos"), ("awful", "neg"), ("lovely", "pos"),
                                                    ("terrible", "neg")] * 4]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name_or_path": "minilm"},
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]},
        "data": {"train_file": str(data), "eval_file": str(data), "max_length": 8},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 8, "lr": 1e-3, "threads": 1},
    }))
    assert main(["train", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "eval_accuracy" in out.out and "trainable params: " in out.err
    meta = json.loads((tmp_path / "run" / "adapter" / "training_meta.json").read_text())
    assert (meta["task"], meta["labels"], meta["num_labels"], meta["base"]) == \
        ("classification", ["neg", "pos"], 2, "minilm")
    # the head trains in full (SEQ_CLS -> modules_to_save) and is saved with the adapter
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in keys
    assert main(["predict", "--adapter", str(tmp_path / "run" / "adapter"), "great", "awful",
                 "--file", str(data)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 2 + len(rows) and lines[0].endswith("\tgreat")
    assert lines[0].split("\t")[0] in ("neg", "pos")
    assert f"on {len(rows)} labelled records" in captured.err
