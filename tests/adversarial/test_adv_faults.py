"""kill -9 at the worst moments — inside checkpoint pruning (half a folder deleted), just before
each rename of a checkpoint save, and inside `lorakit merge --overwrite`'s swap — then check that
no partial folder is visible (README promise: atomic saves). In the tally "served" means the state
after the kill was whole: every `step-N` is whole, `--out` is
the old or the new checkpoint, whole, and the next run cleans what the kill left."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import env_for_subprocess, save_adapter, save_base

from lorakit.export.merge import clean_stale, merge_to_checkpoint
from lorakit.train import checkpoint as ckpt

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[1] / "examples" / "data"


def run_with_fault(point: str, nth: int, argv: list[str]) -> int:
    cmd = [sys.executable, str(HERE / "fault_runner.py"), point, str(nth), *map(str, argv)]
    return subprocess.run(cmd, env=env_for_subprocess(), capture_output=True, timeout=300).returncode


def whole_checkpoint(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ckpt.FILES) and \
        (folder / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_promise_atomic_saves_kill_9_inside_checkpoint_pruning_and_saving(tmp_path, tally):
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({
        "model": {"name_or_path": "tiny-llama", "overrides": {"hidden_size": 32, "intermediate_size": 64,
                                                               "num_hidden_layers": 1}},
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]},
        "data": {"train_file": str(EXAMPLES / "instructions.jsonl"), "max_length": 128, "limit": 8},
        "train": {"output_dir": str(run), "max_steps": 8, "batch_size": 4, "threads": 1, "save_every": 1,
                  "keep_last": 1, "log_every": 1}}))
    rng = random.Random(12)
    points = [("rmtree", rng.randint(1, 3)), ("replace", rng.randint(2, 6))]  # inside a prune, before a save's rename
    area = "kill -9 in checkpoint save/prune"
    for i, (point, nth) in enumerate(points):
        code = run_with_fault(point, nth, ["train", cfg, "--no-progress"] + (["--resume"] if i else []))
        visible = [p for p in ckpt.checkpoint_root(run).iterdir() if not p.name.startswith(".")] \
            if ckpt.checkpoint_root(run).is_dir() else []
        partial = [p.name for p in visible if not whole_checkpoint(p)]
        assert code == -9, f"{point}#{nth} did not kill the run (rc {code})"
        tally.record(area, "partial_folder" if partial else "served", f"{point}#{nth} rc={code}: {partial}")
    code = subprocess.run([sys.executable, "-m", "lorakit", "train", str(cfg), "--no-progress", "--resume"],
                          env=env_for_subprocess(), capture_output=True, timeout=300)
    tally.record(area, "served" if code.returncode == 0 else "unclear", code.stderr.decode()[-300:])
    hidden = [p.name for p in ckpt.checkpoint_root(run).iterdir() if p.name.startswith(".")]
    if hidden:
        tally.record(area, "partial_folder", f"left after a clean resume: {hidden}")
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [8]
    assert tally.bad(area) == []


@pytest.mark.slow
def test_promise_atomic_saves_kill_9_inside_merge_overwrite(tmp_path, tally):
    base = save_base(tmp_path / "base")
    adapters = [save_adapter(base, tmp_path / f"a{i}", seed=i + 1) for i in range(2)]
    out = tmp_path / "out"
    merge_to_checkpoint(base, [adapters[0]], out)
    area = "kill -9 in merge --overwrite"
    versions = {(out / "model.safetensors").read_bytes()}
    # before the new folder's rename (the old one already moved aside), and inside deleting the old one
    for point, nth, adapter in [("replace", 2, adapters[1]), ("rmtree", 1, adapters[1])]:
        code = run_with_fault(point, nth, ["merge", "--base", base, "--adapter", adapter, "--out", out, "--overwrite"])
        assert code == -9, f"{point}#{nth} did not kill the merge (rc {code})"
        clean_stale(out)  # what the next merge does first
        ok = (out / "config.json").is_file() and (out / "model.safetensors").is_file()
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        tally.record(area, "served" if ok and not leftovers else "partial_folder", f"{point}#{nth}: {leftovers}")
        if ok:
            versions.add((out / "model.safetensors").read_bytes())
    assert tally.bad(area) == []
    assert len(versions) == 2  # the first kill left the old --out, the second the new one: each whole
