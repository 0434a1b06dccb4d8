"""Hostile training configs, data files and merge inputs through the real CLI entry point:
0 tracebacks — each is one line on stderr with a non-zero exit code, or it runs."""

from __future__ import annotations

import json

import pytest
from generators import adapter_folders, data_files, train_configs
from serve_helpers import save_adapter, save_base

from lorakit.cli import main

GOOD_LINE = json.dumps({"prompt": "what is two", "completion": "two"})


def classify(code: int, err: str, escaped: BaseException | None) -> str:
    if escaped is not None or "Traceback" in err:
        return "traceback"
    if code == 0:
        return "served"
    lines = [x for x in err.splitlines() if x.strip() and "warn" not in x.lower() and not x.startswith(" ")]
    return "refused" if len(lines) == 1 else "unclear"


def run_cli(capsys, argv) -> tuple[int, str, BaseException | None]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # noqa: BLE001 - counted as a traceback
        return 1, capsys.readouterr().err, exc
    return code, capsys.readouterr().err, None


def test_train_configs_never_traceback(tmp_path, capsys, tally):
    data = tmp_path / "data.jsonl"
    data.write_text((GOOD_LINE + "\n") * 4)
    for i, (name, text, sets) in enumerate(train_configs(data, tmp_path / "run")):
        cfg = tmp_path / f"cfg{i}.yaml"
        cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
        code, err, escaped = run_cli(capsys, ["train", cfg, "--no-progress", *sets])
        tally.record("train configs (CLI)", classify(code, err, escaped), f"{name}: {err[-300:]} {escaped!r}")
    assert tally.bad("train configs (CLI)") == []


@pytest.mark.parametrize("on_bad_record", ["error", "skip"])
def test_train_data_files_never_traceback(tmp_path, capsys, tally, on_bad_record):
    for i, (name, payload) in enumerate(data_files(GOOD_LINE)):
        data = tmp_path / f"data{i}.jsonl"
        data.write_bytes(payload)
        cfg = {"model": {"name_or_path": "tiny-llama", "overrides": {"hidden_size": 32, "intermediate_size": 64,
                                                                       "num_hidden_layers": 1}},
               "data": {"train_file": str(data), "max_length": 32, "on_bad_record": on_bad_record,
                        "format": "prompt_completion"},
               "train": {"output_dir": str(tmp_path / f"run{i}"), "max_steps": 1, "batch_size": 2, "threads": 1}}
        path = tmp_path / f"cfg{i}.yaml"
        path.write_text(json.dumps(cfg))
        code, err, escaped = run_cli(capsys, ["train", path, "--no-progress"])
        tally.record("train data files (CLI)", classify(code, err, escaped), f"{name}: {err[-300:]} {escaped!r}")
    assert tally.bad("train data files (CLI)") == []


def test_merge_of_broken_adapters_never_tracebacks_and_leaves_no_output(tmp_path, capsys, tally):
    base = save_base(tmp_path / "base")
    good = save_adapter(base, tmp_path / "good", seed=1)
    cases = list(adapter_folders(good, tmp_path / "cases", seed=3, config_cases=30))
    cases += [("weights nan", good, ["--weights", "nan"]), ("weights inf", good, ["--weights", "inf"]),
              ("shard size lots", good, ["--max-shard-size", "lots"]), ("shard size 0", good, ["--max-shard-size", "0"]),
              ("shard size -1GB", good, ["--max-shard-size", "-1GB"]), ("two weights", good, ["--weights", "1", "2"])]
    for i, case in enumerate(cases):
        name, folder, extra = case if len(case) == 3 else (*case, [])
        out = tmp_path / f"out{i}"
        code, err, escaped = run_cli(capsys, ["merge", "--base", base, "--adapter", folder, "--out", out, *extra])
        outcome = classify(code, err, escaped)
        tally.record("merge inputs (CLI)", outcome, f"{name}: {err[-300:]} {escaped!r}")
        if outcome != "served" and out.exists():
            tally.record("merge inputs (CLI)", "partial_folder", f"{name}: {out} exists after a failed merge")
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".out{i}.")]
        if leftovers:
            tally.record("merge inputs (CLI)", "partial_folder", f"{name}: {leftovers}")
    assert tally.bad("merge inputs (CLI)") == []
