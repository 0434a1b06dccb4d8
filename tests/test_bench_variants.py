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


def test_the_pick_is_the_best_mean_over_tuning_seeds_and_a_tie_goes_to_the_smaller_lr(tmp_path, monkeypatch):
    # seed 100 alone would pick 5e-3 (0.80); over both seeds 2e-3 wins (0.76 vs 0.70); 1e-2 diverges
    val_acc = {(2e-3, 100): 0.78, (2e-3, 101): 0.74, (5e-3, 100): 0.80, (5e-3, 101): 0.60,
               (1e-2, 100): 0.90, (1e-2, 101): 0.90}
    seen = []

    def fake_train(variant, fit, val, steps, batch, lr, seed):
        seen.append((len(fit[2]), len(val[2])))
        loss = float("nan") if lr == 1e-2 else 0.5
        return dict(accuracy=val_acc[(lr, seed)], final_loss=loss, half_loss=1.0, trainable=1, step_ms=1.0)

    monkeypatch.setattr(bench_variants, "train", fake_train)
    data = (torch.zeros(10, 4), torch.ones(10, 4), torch.arange(10))
    variant = bench_variants.variants(64)[0]
    log = bench_variants.RunLog(str(tmp_path / "runs.jsonl"), SETUP)
    assert bench_variants.tune_lrs([variant], data, 64, 16, [2e-3, 5e-3, 1e-2], [100, 101], log) == {"LoRA": 2e-3}
    assert set(seen) == {(8, 2)}  # trained on the first 80%, scored on the held-out last 20%
    assert bench_variants.tune_lrs([variant], data, 64, 16, [2e-3, 5e-3], [100], log) == {"LoRA": 5e-3}
    assert len(seen) == 6  # the second call read its runs back

    val_acc.update({(1e-3, 100): 0.80})
    assert bench_variants.tune_lrs([variant], data, 64, 16, [1e-3, 5e-3], [100], log) == {"LoRA": 1e-3}
