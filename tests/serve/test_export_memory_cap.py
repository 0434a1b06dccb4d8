"""`lorakit merge` of a checkpoint larger than the memory it may use: streaming succeeds, in-memory fails.

Each `lorakit merge` runs in its own process. It first merges a tiny model (imports, lazy initialisation), then
caps its own address space (RLIMIT_AS, which counts every mapping: heap, anonymous and file mmaps) at
what it uses now plus BUDGET (96 MiB), and merges a 211 MiB fp32 checkpoint (8 MB shards in and out). The
streaming merge fits in the budget; the in-memory merge of the same inputs under the same cap fails
with an out-of-memory error, which shows the cap bites.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from serve_helpers import env_for_subprocess

from lorakit.bench.random_checkpoint import random_adapter, random_llama

BUDGET = 96 << 20  # bytes of address space the merge may add to what the warmed-up process uses
SHARD = "8MB"
# glibc raises its mmap threshold each time a large block is freed, so later blocks up to that size come from
# the heap, whose high-water mark stays mapped after they are freed: the address space would then track
# malloc's history, not the memory in use (up to +160 MiB here through the CLI). A fixed threshold turns that
# off for both modes alike; the benchmark's RSS figures (BENCHMARKS.md) run without it.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
CHILD = r"""
import resource, sys
from lorakit.cli import main

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

def merge(base, adapter, out):
    # one thread: every extra thread's malloc arena reserves 64 MiB of address space, which RLIMIT_AS counts
    return main(["merge", "--base", base, "--adapter", adapter, "--out", out, "--max-shard-size", shard,
                 "--threads", "1"] + (["--in-memory"] if mode == "in_memory" else []))

base, adapter, out, mode, budget, shard, warm_base, warm_adapter = sys.argv[1:9]
assert merge(warm_base, warm_adapter, out + ".warm") == 0  # the same command once: imports, lazy init
cap = vm_size() + int(budget)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
sys.exit(merge(base, adapter, out))
"""


def _merge(root: Path, mode: str) -> subprocess.CompletedProcess:
    """`lorakit merge` in a process capped at its warmed-up address space + BUDGET."""
    return subprocess.run([sys.executable, "-c", CHILD, str(root / "base"), str(root / "adapter"),
                           str(root / f"out-{mode}"), mode, str(BUDGET), SHARD, str(root / "warm-base"),
                           str(root / "warm-adapter")], capture_output=True, text=True, timeout=600,
                          env={**env_for_subprocess(), "OMP_NUM_THREADS": "1", **FIXED_MMAP_THRESHOLD})


def _tensor(folder: Path, key: str) -> torch.Tensor:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(folder / index[key], framework="pt") as fh:
        return fh.get_tensor(key).clone()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streaming_merge_fits_a_memory_cap_the_in_memory_merge_does_not(tmp_path):
    model_bytes = random_llama(tmp_path / "base", hidden=512, layers=16, shard=SHARD, vocab=4000)
    random_adapter(tmp_path / "adapter", hidden=512, layers=16, rank=8)
    random_llama(tmp_path / "warm-base", hidden=64, layers=1, shard=SHARD, vocab=256)
    random_adapter(tmp_path / "warm-adapter", hidden=64, layers=1, rank=4)
    assert model_bytes > 2 * BUDGET  # the checkpoint can't fit in the budget, not even once

    proc = _merge(tmp_path, "streaming")
    assert proc.returncode == 0 and ", streamed;" in proc.stdout, proc.stderr[-3000:]
    out = tmp_path / "out-streaming"
    assert sum(p.stat().st_size for p in out.glob("*.safetensors")) >= model_bytes
    # one merged weight against plain math: W + (alpha / r) · B·A, alpha = 2r
    key = "model.layers.7.self_attn.q_proj.weight"
    stem = "base_model.model.model.layers.7.self_attn.q_proj"
    a = _tensor_file(tmp_path / "adapter", f"{stem}.lora_A.weight")
    b = _tensor_file(tmp_path / "adapter", f"{stem}.lora_B.weight")
    want = (_tensor(tmp_path / "base", key).float() + 2.0 * (b @ a)).float()
    assert torch.equal(_tensor(out, key), want)
    untouched = "model.layers.7.input_layernorm.weight"
    assert torch.equal(_tensor(out, untouched), _tensor(tmp_path / "base", untouched))

    proc = _merge(tmp_path, "in_memory")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "lorakit merge: out of memory" in proc.stderr and "drop --in-memory" in proc.stderr, proc.stderr[-3000:]
    assert not [p for p in tmp_path.iterdir() if p.name == "out-in_memory" or p.name.startswith(".out-in_memory")]


def _tensor_file(folder: Path, key: str) -> torch.Tensor:
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as fh:
        return fh.get_tensor(key).clone()
