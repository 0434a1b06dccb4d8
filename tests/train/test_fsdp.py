"""train.parallel: fsdp (FSDP2 fully_shard) with real torchrun processes (gloo on CPU, NCCL on CUDA).

The reference for every sharded run is the same config trained by one process at the same global
batch: the adapter and the loss curve must agree to fp32 reduction order (rtol 1e-4).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_train_processes import env, raw_config, tensors

from lorakit.errors import ConfigError
from lorakit.quant import Linear4bit
from lorakit.train import checkpoint as ckpt
from lorakit.train.config import load_config
from lorakit.train.trainer import train


def make_linear(in_features: int, out_features: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features)


TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
needs_torchrun = pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")


# ---------------------------------------------------------------------- fast: config and storage


@pytest.mark.parametrize("lora", [{"peft_type": "ADALORA", "target_r": 2, "init_r": 4, "total_step": 10},
                                  {"use_dylora": True}])
def test_fsdp_refuses_variants_that_cannot_be_sharded(tmp_path, lora):
    raw = raw_config(tmp_path / "x", max_steps=10, parallel="fsdp")
    raw["lora"].update(lora)
    with pytest.raises(ConfigError, match="train.parallel: fsdp can't train .*use train.parallel: ddp"):
        load_config(raw=raw)
    raw["train"]["parallel"] = "ddp"
    assert load_config(raw=raw).train.parallel == "ddp"  # the same adapter is fine data-parallel


def test_parallel_defaults_to_ddp_and_rejects_unknown_names(tmp_path):
    assert load_config(raw=raw_config(tmp_path / "x")).train.parallel == "ddp"
    with pytest.raises(ConfigError, match="parallel"):
        load_config(raw=raw_config(tmp_path / "x", parallel="zero3"))


def test_4bit_codes_as_a_frozen_parameter_change_nothing_else():
    layer = Linear4bit.from_linear(make_linear(96, 40))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 96)
    want = layer(x)
    layer.store_as_parameter_().store_as_parameter_()  # idempotent
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert not list(layer.buffers())
    after = layer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(layer(x), want)
    other = Linear4bit.from_linear(make_linear(96, 40, seed=1)).store_as_parameter_()
    other.load_state_dict(before)  # the bitsandbytes layout loads into the parameter form too
    assert isinstance(other.weight, torch.nn.Parameter) and torch.equal(other(x), want)
    delta = torch.full((40, 96), 0.01)
    with pytest.warns(UserWarning):
        other.add_to_weight_(delta)
    assert isinstance(other.weight, torch.nn.Parameter) and not other.weight.requires_grad
    torch.testing.assert_close(other(x), F.linear(x, other.dequantize(), other.bias))


def test_resume_must_keep_the_global_batch(tmp_path):
    raw = raw_config(tmp_path / "run", max_steps=2, save_every=1)
    train(load_config(raw=raw))
    before = [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")]
    raw["train"]["batch_size"] = 3
    with pytest.raises(ConfigError, match=r"global batch of 2 rows .* set train.batch_size so that batch_size × "
                                          r"processes = 2"):
        train(load_config(raw=raw), resume=True)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == before  # nothing saved is lost
    assert (tmp_path / "run" / "adapter").is_dir()


# ---------------------------------------------------------------------- torchrun


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config_file(tmp_path: Path, raw: dict, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def torchrun(cfg: Path, nproc: int, *extra: str, cwd: Path, resume: bool = False,
             timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), "-m", "lorakit", "train", str(cfg),
           "--no-progress", *(["--resume"] if resume else []), *extra]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def assert_same_run(got: Path, want: Path) -> None:
    a, b = tensors(want), tensors(got)
    assert a.keys() == b.keys()
    for key in a:  # fp32 sums in another order: rtol 1e-4, atol at fp32 rounding of the tensor's scale
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=float(a[key].abs().max()) * 1e-5)
    torch.testing.assert_close(losses(got), losses(want), rtol=1e-4, atol=0.0)


def reference(tmp_path: Path, raw: dict, global_batch: int) -> Path:
    one = {**raw, "train": {**raw["train"], "output_dir": str(tmp_path / "one"), "batch_size": global_batch}}
    return train(load_config(raw=one)).run_dir


def device_for(nproc: int) -> str:
    """NCCL on GPUs when there is one per process (the code picks it by itself); else gloo on CPU."""
    return "auto" if torch.cuda.device_count() >= nproc else "cpu"


def sharded_config(tmp_path: Path, quant: str, parallel: str, nproc: int = 2, **train_keys) -> dict:
    raw = raw_config(tmp_path / "run", max_steps=4, log_every=1, parallel=parallel, device=device_for(nproc),
                     **train_keys)
    raw["lora"]["lora_dropout"] = 0.0  # each process draws its own dropout masks
    raw["quant"] = {"method": quant}
    raw["data"]["eval_file"] = raw["data"]["train_file"]
    raw["train"]["eval_every"] = 2
    raw["train"]["eval_batch_size"] = 3  # 8 rows -> 3 eval batches: one process runs an extra, empty round
    return raw


@pytest.mark.slow
@needs_torchrun
@pytest.mark.parametrize(("parallel", "quant", "nproc", "checkpointing", "variant"), [
    ("fsdp", "none", 2, False, {"use_dora": True}), ("fsdp", "nf4", 2, True, {}),
    ("ddp", "nf4", 2, False, {}), ("fsdp", "nf4", 4, False, {})])
def test_processes_match_one_at_the_same_global_batch(tmp_path, parallel, quant, nproc, checkpointing, variant):
    raw = sharded_config(tmp_path, quant, parallel, nproc, batch_size=4 // nproc,
                         gradient_checkpointing=checkpointing)
    raw["lora"].update(variant)  # DoRA: its magnitude vectors are sharded with the blocks
    want = reference(tmp_path, raw, 4)
    done = torchrun(config_file(tmp_path, raw, "c"), nproc, cwd=tmp_path)
    assert_same_run(tmp_path / "run", want)
    final = [json.loads((p / "summary.json").read_text())["final"] for p in (want, tmp_path / "run")]
    assert abs(final[0]["eval_loss"] - final[1]["eval_loss"]) <= 1e-5 * abs(final[0]["eval_loss"])
    assert done.stdout.count("done: ") == 1  # rank 0 alone reports and writes
    if parallel == "fsdp":  # each process holds 1/N of the parameters (buffers and 4-bit quant states whole)
        line = next(x for x in (done.stdout + done.stderr).splitlines() if x.startswith("fsdp: "))
        held, whole, kept = (float(w) for w in re.findall(r"([\d.]+(?:e[-+]?\d+)?) MiB", line))
        # rounding to 4 digits and each tensor's dim-0 padding to a multiple of N: 2% of the shard
        assert abs((held - kept) - (whole - kept) / nproc) <= 0.02 * (whole - kept) / nproc, line


def worker_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


@pytest.mark.slow
@needs_torchrun
def test_kill_9_of_one_process_then_resume_is_bit_identical_and_another_count_resumes(tmp_path):
    raw = sharded_config(tmp_path, "nf4", "fsdp", batch_size=2)
    raw["train"].update(max_steps=20, save_every=3, eval_every=0)
    raw["data"].pop("eval_file")
    whole = {**raw, "train": {**raw["train"], "output_dir": str(tmp_path / "whole")}}
    torchrun(config_file(tmp_path, whole, "whole"), 2, cwd=tmp_path)

    run = tmp_path / "run"
    cfg = config_file(tmp_path, raw, "c")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "lorakit", "train", str(cfg), "--no-progress"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.time() + 200
    while not (run / "checkpoints" / "step-6").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(worker_pids(proc.pid)[-1], signal.SIGKILL)  # one worker dies; torchrun ends the job
    proc.wait(timeout=120)
    assert proc.returncode != 0
    killed_at = max(s for s, _ in ckpt.list_checkpoints(run))
    assert not (run / "adapter").exists() and killed_at < 20, "the run finished before the kill"
    other = tmp_path / "other"
    shutil.copytree(run, other)

    done = torchrun(cfg, 2, cwd=tmp_path, resume=True)
    assert f"resuming after step {killed_at}" in done.stderr + done.stdout
    want, got = tensors(tmp_path / "whole"), tensors(run)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert losses(run) == losses(tmp_path / "whole")

    # one process (global batch kept: batch_size 4) continues the two-process run
    one = {**raw, "train": {**raw["train"], "output_dir": str(other), "batch_size": 4}}
    single = subprocess.run([sys.executable, "-m", "lorakit", "train", str(config_file(tmp_path, one, "one")),
                             "--no-progress", "--resume"], env=env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "saved by 2 process(es) with 1" in single.stderr + single.stdout
    assert "last bits" in single.stderr + single.stdout
    assert_same_run(other, tmp_path / "whole")


def node_env(rank: int) -> dict:
    """Each loopback "node" sees its own GPU (local rank 0 on both), as separate machines would."""
    e = env()
    if torch.cuda.device_count() >= 2:
        e["CUDA_VISIBLE_DEVICES"] = str(rank)
    return e


@pytest.mark.slow
@needs_torchrun
def test_two_nodes_on_loopback_match_one_process(tmp_path):
    raw = sharded_config(tmp_path, "nf4", "fsdp", batch_size=2)
    want = reference(tmp_path, raw, 4)
    cfg = config_file(tmp_path, raw, "c")
    port = free_port()
    nodes = [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                               "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "lorakit", "train", str(cfg), "--no-progress"],
                              env=node_env(rank), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path)
             for rank in (0, 1)]
    outs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outs):
        assert node.returncode == 0, err[-3000:]
    assert_same_run(tmp_path / "run", want)
    assert sum(out.count("done: ") for out, _ in outs) == 1  # global rank 0, on node 0, writes
