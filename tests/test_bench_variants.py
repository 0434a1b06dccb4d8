"""benchmarks/bench_variants.py --results: every finished training is on disk at once, and a rerun of the
same command reads those back instead of retraining them (a run stopped by a deadline leaves its numbers)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_variants  # noqa: E402

SETUP = dict(steps=64, batch=16, train=764, max_len=32)
RESULT = dict(trainable=76038, step_ms=312.5, half_loss=1.25, final_loss=0.5, accuracy=0.75,
              sweep={1: 0.5, 2: 0.625, 4: 0.75, 8: 0.875}, model="not saved")


def test_a_record_reads_back_under_its_own_setup_only(tmp_path):
    path = str(tmp_path / "runs.jsonl")
    bench_variants.RunLog(path, SETUP).add("test", "LoRA", 5e-3, 1, RESULT)

    again = bench_variants.RunLog(path, SETUP).get("test", "LoRA", 5e-3, 1)
    assert again == dict({k: v for k, v in RESULT.items() if k != "model"}, name="LoRA", read_back=True)
    assert list(again["sweep"]) == [1, 2, 4, 8]  # int ranks again, not JSON's string keys
    fresh = bench_variants.RunLog(path, SETUP)
    assert fresh.get("tune", "LoRA", 5e-3, 1) is None  # a tuning run is not a test run
    assert fresh.get("test", "LoRA", 2e-3, 1) is None and fresh.get("test", "LoRA", 5e-3, 2) is None
    assert fresh.get("test", "rsLoRA", 5e-3, 1) is None
    assert bench_variants.RunLog(path, dict(SETUP, steps=10)).get("test", "LoRA", 5e-3, 1) is None


def test_a_line_torn_by_a_kill_is_skipped_and_the_rest_still_read(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    bench_variants.RunLog(str(path), SETUP).add("tune", "DoRA", 1e-3, 100, RESULT)
    with open(path, "a") as f:
        f.write('{"kind": "tune", "name": "DoRA", "lr": 0.002, "se')  # the process died mid-line
    log = bench_variants.RunLog(str(path), SETUP)
    assert "runs.jsonl:2: not a whole JSON record" in capsys.readouterr().out
    assert log.get("tune", "DoRA", 1e-3, 100)["accuracy"] == 0.75
    assert log.get("tune", "DoRA", 2e-3, 100) is None


@pytest.fixture
def threads_restored(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # two short trainings of MiniLM (~30 s on one thread)
def test_a_rerun_reads_every_finished_training_back_and_trains_nothing(tmp_path, monkeypatch, capsys,
                                                                      threads_restored):
    path = tmp_path / "runs.jsonl"
    argv = ["--quick", "--only", "LoRA", "--tune-lr", "5e-3", "--seeds", "0", "--plot", "",
            "--results", str(path)]
    bench_variants.main(argv)
    first = capsys.readouterr().out
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["kind"], r["name"], r["lr"], r["seed"]) for r in records] == [("tune", "LoRA", 5e-3, 100),
                                                                            ("test", "LoRA", 5e-3, 0)]
    assert sorted(records[1]["result"]["sweep"]) == ["1", "2", "4", "8"]  # LoRA's truncation sweep kept too

    def no_training(*args, **kwargs):
        raise AssertionError("a finished training was run again")

    monkeypatch.setattr(bench_variants, "train", no_training)
    bench_variants.main(argv)
    second = capsys.readouterr().out
    assert second.count("(read back from --results)") == 2
    table = [line for line in first.splitlines() if line.startswith("| LoRA ")]
    assert len(table) == 2  # the variants table's row and the truncation sweep's
    # the same picks, accuracies and losses; only the step-time columns may differ (interleaved vs in-run)
    same = [line for line in second.splitlines() if line.startswith("| LoRA ")]
    assert [r.split("|")[1:3] + r.split("|")[6:] for r in same] == [r.split("|")[1:3] + r.split("|")[6:]
                                                                     for r in table]
    assert len(path.read_text().splitlines()) == 2  # nothing appended twice
