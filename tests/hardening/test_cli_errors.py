"""Every CLI error is one line on stderr with a non-zero exit code, never a traceback; --debug
shows the traceback. Each case below printed a traceback before."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file, save_file
from serve_helpers_path import env_for_subprocess, save_adapter, save_base  # noqa: F401

from lorakit.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith("  ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = save_base(root / "base")
    good = save_adapter(base, root / "good", seed=1)
    nan = root / "nan"
    nan.mkdir()
    (nan / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    tensors = load_file(good / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    return {"base": base, "good": good, "nan": nan, "root": root}


@pytest.mark.parametrize("extra,needle", [
    (["--adapter", "{nan}"], "NaN/inf"),
    (["--adapter", "{good}", "--weights", "nan"], "--weights must be finite"),
    (["--adapter", "{good}", "--weights", "inf"], "--weights must be finite"),
    (["--adapter", "{good}", "--max-shard-size", "lots"], "--max-shard-size"),
])
def test_merge_errors_are_one_line(model_dirs, tmp_path, capsys, extra, needle):
    extra = [e.format(**model_dirs) for e in extra]
    code, err = run(capsys, "merge", "--base", model_dirs["base"], "--out", tmp_path / "out", *extra)
    assert_one_line(code, err, needle)
    assert not (tmp_path / "out").exists()


def _train_config(tmp_path, data_file, **sections):
    cfg = {"model": {"name_or_path": "tiny-llama", "overrides": {"hidden_size": 32, "intermediate_size": 64,
                                                                   "num_hidden_layers": 1}},
           "data": {"train_file": str(data_file), "max_length": 32},
           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _good_jsonl(path, n=4):
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(n)))
    return path


DATA = {
    "binary": lambda p: p.write_bytes(bytes(range(256)) * 8),
    "utf16": lambda p: p.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n", encoding="utf-16"),
    "bad_utf8_after_valid": lambda p: p.write_bytes(_good_jsonl(p).read_bytes() + b'{"prompt": "\xff\xfe"}\n'),
    "deep_line": lambda p: p.write_text("[" * 100_000 + "]" * 100_000 + "\n"),
}


@pytest.mark.parametrize("case", list(DATA))
def test_train_on_undecodable_data_is_one_line(tmp_path, capsys, case):
    data = tmp_path / "data.jsonl"
    DATA[case](data)
    code, err = run(capsys, "train", _train_config(tmp_path, data))
    assert_one_line(code, err, "data.jsonl")


def test_invalid_utf8_line_is_skipped_with_on_bad_record_skip(tmp_path):
    from lorakit.train.records import read_records

    data = tmp_path / "data.jsonl"
    DATA["bad_utf8_after_valid"](data)
    records = read_records(str(data), on_bad_record="skip")
    assert len(records.items) == 4 and records.bad == 1 and "UTF-8" in records.bad_examples[0]


def test_binary_config_file_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(b"\x00\xff\xfe" + bytes(range(256)))
    assert_one_line(*run(capsys, "train", cfg), "cfg.yaml")


@pytest.mark.parametrize("sections,sets,needle", [
    ({"train": {"adam_betas": [2, 3]}}, [], "adam_betas"),
    ({"lora": {"r": 4, "target_modules": 5}}, [], "target_modules"),
    ({"lora": {"r": 4, "target_modules": "all-linear", "rank_pattern": [1]}}, [], "rank_pattern"),
    ({}, ["--set", "lora.rank_pattern=7"], "rank_pattern"),
    ({"model": {"overrides": {"num_attention_heads": 5}}}, [], "model.overrides"),
    ({"model": {"overrides": {"hidden_size": -1}}}, [], "model.overrides"),
])
def test_train_config_value_errors_are_one_line(tmp_path, capsys, sections, sets, needle):
    data = _good_jsonl(tmp_path / "data.jsonl")
    assert_one_line(*run(capsys, "train", _train_config(tmp_path, data, **sections), *sets), needle)


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    import lorakit.analysis.compress as compress_module

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(compress_module, "compress", bug)
    argv = ["compress", str(tmp_path), "--rank", "1", "--out", str(tmp_path / "c")]
    code, err = run(capsys, *argv)
    assert_one_line(code, err, "ZeroDivisionError", "--debug")
    with pytest.raises(ZeroDivisionError):
        main([*argv, "--debug"])


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["merge", "--weights", "x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_real_process_prints_no_traceback(model_dirs, tmp_path):
    out = subprocess.run([sys.executable, "-m", "lorakit", "merge", "--base", str(model_dirs["base"]),
                          "--adapter", str(model_dirs["good"]), "--out", str(tmp_path / "o"),
                          "--max-shard-size", "lots"], capture_output=True, text=True, env=env_for_subprocess(),
                         timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.parametrize("change", [{"target_modules": 5}, {"rank_pattern": [1]}, {"lora_alpha": "Infinity"}])
def test_serve_with_a_mistyped_adapter_config_is_one_line(model_dirs, tmp_path, capsys, change):
    import torch

    folder = tmp_path / "bad"
    folder.mkdir()
    config = json.loads((model_dirs["good"] / "adapter_config.json").read_text())
    config.update(change)
    (folder / "adapter_config.json").write_text(json.dumps(config).replace('"Infinity"', "Infinity"))
    (folder / "adapter_model.safetensors").write_bytes((model_dirs["good"] / "adapter_model.safetensors").read_bytes())
    threads = torch.get_num_threads()
    try:
        code, err = run(capsys, "serve", "--base", model_dirs["base"], "--adapter", f"x={folder}", "--threads", "1")
    finally:
        torch.set_num_threads(threads)
    assert_one_line(code, err, next(iter(change)))
