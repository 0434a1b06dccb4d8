"""`lorakit merge` of a checkpoint larger than the memory it may use: streaming succeeds, in-memory fails.

Each merge runs in its own process. It first merges a tiny model (imports, lazy initialisation), then
caps its own address space (RLIMIT_AS, which counts every mapping: heap, anonymous and file mmaps) at
what it uses now plus BUDGET, and merges a 160 MiB fp32 checkpoint (8 MB shards in and out). The
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

BUDGET = 64 << 20  # bytes of address space the merge may add to what the warmed-up process uses
SHARD = "8MB"
CHILD = r"""
import json, resource, sys
from lorakit.export.merge import merge_to_checkpoint

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

base, adapter, out, mode, budget, shard, warm_base, warm_adapter = sys.argv[1:9]
streaming = mode == "streaming"
merge_to_checkpoint(warm_base, [warm_adapter], out + ".warm", streaming=streaming, max_shard_size=shard)
cap = vm_size() + int(budget)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
try:
    report = merge_to_checkpoint(base, [adapter], out, streaming=streaming, max_shard_size=shard)
except (MemoryError, RuntimeError, OSError) as exc:
    print(json.dumps({"failed": f"{type(exc).__name__}: {exc}"[:400]}))
    sys.exit(3)
print(json.dumps({"streamed": report.streamed, "files": report.files}))
"""


def _merge(root: Path, mode: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root / "base"), str(root / "adapter"),
                           str(root / f"out-{mode}"), mode, str(BUDGET), SHARD, str(root / "warm-base"),
                           str(root / "warm-adapter")], capture_output=True, text=True, timeout=600,
                          env={**env_for_subprocess(), "OMP_NUM_THREADS": "1"})
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-2000:]
    return proc.returncode, json.loads(lines[-1])


def _tensor(folder: Path, key: str) -> torch.Tensor:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(folder / index[key], framework="pt") as fh:
        return fh.get_tensor(key).clone()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_streaming_merge_fits_a_memory_cap_the_in_memory_merge_does_not(tmp_path):
    model_bytes = random_llama(tmp_path / "base", hidden=512, layers=12, shard=SHARD, vocab=4000)
    random_adapter(tmp_path / "adapter", hidden=512, layers=12, rank=8)
    random_llama(tmp_path / "warm-base", hidden=64, layers=1, shard=SHARD, vocab=256)
    random_adapter(tmp_path / "warm-adapter", hidden=64, layers=1, rank=4)
    assert model_bytes > 2 * BUDGET  # the checkpoint can't fit in the budget, not even once

    code, result = _merge(tmp_path, "streaming")
    assert code == 0 and result["streamed"], result
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

    code, result = _merge(tmp_path, "in_memory")
    assert code == 3, result
    assert "Cannot allocate memory" in result["failed"] or "MemoryError" in result["failed"], result


def _tensor_file(folder: Path, key: str) -> torch.Tensor:
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as fh:
        return fh.get_tensor(key).clone()
