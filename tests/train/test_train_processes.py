"""Real processes: `kill -9` mid-run then --resume, and 2-process torchrun vs 1 process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_helpers import tiny_raw_config

from lorakit.train import checkpoint as ckpt
from lorakit.train.config import load_config
from lorakit.train.trainer import train


def raw_config(out: Path, **train) -> dict:
    return tiny_raw_config(out, **{"log_every": 5, **train})


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p and "site-packages" not in p])
    return e


def tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_same_adapter(tmp_path):
    steps = 40  # the kill comes after step 8: 32 steps of margin for the poll to notice
    reference = train(load_config(raw=raw_config(tmp_path / "ref", max_steps=steps, save_every=4)))
    run = tmp_path / "killed"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw_config(run, max_steps=steps, save_every=4)))
    cmd = [sys.executable, "-m", "lorakit", "train", str(cfg), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step-8").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = [s for s, _ in ckpt.list_checkpoints(run)]
    assert not (run / "adapter").exists() and max(killed_at) < steps, "the run finished before the kill"
    done = subprocess.run(cmd + ["--resume"], env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming after step {max(killed_at)}" in done.stderr
    want, got = tensors(reference.run_dir), tensors(run)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    steps = 4
    one = raw_config(tmp_path / "one", max_steps=steps, batch_size=4, eval_every=2)
    one["lora"]["lora_dropout"] = 0.0  # each process draws its own dropout masks
    one["data"]["eval_file"] = one["data"]["train_file"]
    single = train(load_config(raw=one))
    two = {**one, "train": {**one["train"], "output_dir": str(tmp_path / "two"), "batch_size": 2}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(two))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "lorakit", "train",
                           str(cfg), "--no-progress"], env=env(), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = tensors(single.run_dir), tensors(tmp_path / "two")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
    assert done.stdout.count("done: ") == 1  # rank 0 alone reports (and writes)
    import json

    final_one = json.loads((tmp_path / "one" / "summary.json").read_text())["final"]
    final_two = json.loads((tmp_path / "two" / "summary.json").read_text())["final"]
    assert abs(final_one["eval_loss"] - final_two["eval_loss"]) < 1e-5
