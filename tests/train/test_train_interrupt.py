"""SIGINT/SIGTERM during training (checkpoint, one line, exit code, exact resume); failed runs leave no folder."""

from __future__ import annotations

import os
import shlex
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
from lorakit.train import interrupt
from lorakit.train.config import load_config
from lorakit.train.interrupt import StopSignals, TrainingInterrupted
from lorakit.train.records import DataError
from lorakit.train.trainer import Reporter, train


def raw_config(out: Path, **train) -> dict:
    return tiny_raw_config(out, **{"log_every": 2, **train})


def tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(want: Path, got: Path) -> None:
    a, b = tensors(want), tensors(got)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class SignalAt(Reporter):
    """Sends `signum` to this process when the loop reports step `step` (after its update, mid-bookkeeping)."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def update(self, step: int, info: dict[str, float]) -> None:
        if step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_run_checkpoints_that_step_and_resume_is_bit_identical(tmp_path, signum):
    steps = 7
    reference = train(load_config(raw=raw_config(tmp_path / "ref", max_steps=steps)))
    raw = raw_config(tmp_path / "cut", max_steps=steps, save_every=2)
    before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as info:
        train(load_config(raw=raw), reporter=SignalAt(3, signum))
    assert signal.getsignal(signum) is before  # handlers restored
    exc, run = info.value, tmp_path / "cut"
    assert exc.signum == signum and exc.exit_code == 128 + signum and exc.step == 3 and exc.saved
    assert exc.checkpoint == run / "checkpoints" / "step-3"
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2, 3]  # step 3 is not a save_every step
    assert not (run / "adapter").exists()
    assert str(exc) == f"interrupted ({signal.Signals(signum).name}) after step 3 of 7; checkpoint saved: {exc.checkpoint}"
    resumed = train(load_config(raw=raw), resume=True)
    assert resumed.steps == steps
    assert_same_adapter(reference.run_dir, run)


def test_signal_right_after_a_checkpoint_does_not_write_it_twice(tmp_path):
    raw = raw_config(tmp_path / "run", max_steps=6, save_every=2)
    with pytest.raises(TrainingInterrupted) as info:
        train(load_config(raw=raw), reporter=SignalAt(4, signal.SIGINT))
    assert info.value.step == 4 and not info.value.saved  # step 4 was saved by save_every already
    assert str(info.value).endswith(f"newest checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step-4'}")


def test_signal_before_training_stops_at_once_and_leaves_no_folder(tmp_path, monkeypatch):
    import lorakit.train.trainer as trainer_module

    real = trainer_module.prepare_data

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "prepare_data", interrupted)
    with pytest.raises(TrainingInterrupted) as info:
        train(load_config(raw=raw_config(tmp_path / "new" / "run", max_steps=3)))
    assert info.value.checkpoint is None and info.value.exit_code == 143
    assert str(info.value) == "interrupted (SIGTERM) before training started; nothing was saved"
    assert not (tmp_path / "new").exists()


def test_a_second_signal_later_stops_at_once_but_a_quick_repeat_is_the_same_request(monkeypatch):
    clock = {"t": 100.0}
    monkeypatch.setattr(interrupt.time, "monotonic", lambda: clock["t"])
    stop = StopSignals(enabled=False)
    with pytest.raises(TrainingInterrupted):  # before the loop: at once
        stop._handle(signal.SIGINT, None)
    stop.deferring = True
    stop._handle(signal.SIGINT, None)
    assert stop.signum == signal.SIGINT
    clock["t"] += interrupt.REPEAT_SECONDS / 2  # torchrun forwarding the same Ctrl-C
    stop._handle(signal.SIGINT, None)
    clock["t"] += interrupt.REPEAT_SECONDS
    with pytest.raises(TrainingInterrupted):
        stop._handle(signal.SIGTERM, None)


def test_a_failed_run_leaves_no_folder_but_keeps_what_was_there(tmp_path):
    bad = raw_config(tmp_path / "a" / "b" / "run", max_steps=2)
    bad["data"]["train_file"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError):
        train(load_config(raw=bad))
    assert not (tmp_path / "a").exists()
    # a folder that was there before (the user's, with their files) is left alone
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError):
        train(load_config(raw={**bad, "train": {**bad["train"], "output_dir": str(mine)}}))
    assert (mine / "notes.txt").read_text() == "keep me"
    # a run that fails after writing files into the folder it created takes them away with it
    broken = raw_config(tmp_path / "late", max_steps=2)
    broken["lora"]["target_modules"] = ["no_such_module"]
    with pytest.raises(Exception, match="no_such_module"):
        train(load_config(raw=broken))
    assert not (tmp_path / "late").exists()


def test_cleanup_never_removes_checkpoints_or_foreign_files(tmp_path):
    run = tmp_path / "run"
    created = ckpt.missing_dirs(run)
    assert created == [run.absolute()]
    run.mkdir()
    (run / "config.yaml").write_text("x")
    (run / "theirs.txt").write_text("y")
    assert not ckpt.remove_unused_run_dir(run, created)
    assert sorted(p.name for p in run.iterdir()) == ["theirs.txt"]  # ours went, theirs stayed
    (run / "theirs.txt").unlink()
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    for name in ckpt.FILES:
        (run / "checkpoints" / "step-2" / name).write_bytes(b"")
    assert not ckpt.remove_unused_run_dir(run, created)
    assert (run / "checkpoints" / "step-2").is_dir()


# ---------------------------------------------------------------------- real processes
def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p and "site-packages" not in p])
    return e


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    return train(load_config(raw=raw_config(out, max_steps=STEPS))).run_dir


STEPS = 60  # the signal comes after step 2 is logged: plenty of steps left for it to land mid-run


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_on_lorakit_train(tmp_path, reference_run, signum):
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    raw = raw_config(run, max_steps=STEPS)
    raw["train"]["lr"] = 1.0  # overridden below, so the printed command must carry the --set
    cfg.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "lorakit", "train", str(cfg), "--set", "train.lr=3e-3", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 180
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().strip()):  # step 2 logged: training is under way
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.01)
    os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert line.startswith(f"interrupted ({name}) after step "), err
    step = int(line.split("after step ")[1].split()[0])
    assert 2 <= step < STEPS and [s for s, _ in ckpt.list_checkpoints(run)] == [step]
    resume = line.split("; resume with: ")[1]
    assert resume == shlex.join(["lorakit", "train", str(cfg), "--set", "train.lr=3e-3", "--no-progress",
                                 "--resume"])
    argv = shlex.split(resume)
    done = subprocess.run([sys.executable, "-m", *argv], env=env(), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"resuming after step {step}" in done.stderr
    assert_same_adapter(reference_run, run)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_ctrl_c_under_torchrun_stops_every_process_after_the_same_step(tmp_path):
    """A terminal's Ctrl-C reaches torchrun and both workers (then torchrun forwards it again)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    steps = 200

    def launch(run: Path, *extra: str, **kw) -> subprocess.Popen:
        cfg = tmp_path / f"{run.name}.yaml"
        cfg.write_text(yaml.safe_dump(raw_config(run, max_steps=steps)))
        return subprocess.Popen([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "lorakit", "train",
                                 str(cfg), "--no-progress", *extra], env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, cwd=tmp_path, **kw)

    reference = launch(tmp_path / "ref")  # runs alongside: it only has to finish before the comparison
    run = tmp_path / "cut"
    proc = launch(run, start_new_session=True)
    deadline = time.time() + 180
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("interrupted (SIGINT) after step ")]  # rank 0 only
    step = int(line.split("after step ")[1].split()[0])
    assert step < steps and [s for s, _ in ckpt.list_checkpoints(run)] == [step]
    resume = shlex.split(line.split("; resume with: ")[1])
    assert resume[:4] == ["torchrun", "--standalone", "--nproc_per_node", "2"] and resume[-1] == "--resume"
    done = subprocess.run([torchrun, *resume[1:]], env=env(), capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_adapter(tmp_path / "ref", run)


def test_signal_while_a_resumed_run_loads_keeps_its_checkpoint(tmp_path, monkeypatch):
    import lorakit.train.trainer as trainer_module

    raw = raw_config(tmp_path / "run", max_steps=6)
    with pytest.raises(TrainingInterrupted):
        train(load_config(raw=raw), reporter=SignalAt(2, signal.SIGINT))
    real = trainer_module.prepare_data

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "prepare_data", interrupted)
    with pytest.raises(TrainingInterrupted) as info:
        train(load_config(raw=raw), resume=True)
    step2 = tmp_path / "run" / "checkpoints" / "step-2"
    assert str(info.value) == f"interrupted (SIGINT) before training started; newest checkpoint: {step2}"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2]


def test_the_resume_command_repeats_config_and_overrides(monkeypatch):
    import argparse

    from lorakit.train.cli import rerun_command

    args = argparse.Namespace(config="my cfg.yaml", overrides=["train.lr=1e-4", "lora.r=8"], no_progress=False)
    for var in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert rerun_command(args, True) == "lorakit train 'my cfg.yaml' --set train.lr=1e-4 --set lora.r=8 --resume"
    assert rerun_command(args, False) == "lorakit train 'my cfg.yaml' --set train.lr=1e-4 --set lora.r=8"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert rerun_command(args, True).startswith("torchrun --standalone --nproc_per_node 4 -m lorakit train ")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two machines
    assert rerun_command(args, True).startswith("your torchrun command on every node with -m lorakit train ")
