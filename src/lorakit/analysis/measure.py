"""Measure the real peak memory of a short LoRA training run, to check a MemoryPlan against.

The run happens in a fresh subprocess: peak = VmHWM − VmRSS before the model is built (after
its modelling code is imported, by building it once on the meta device), with the
high-water mark reset (``/proc/self/clear_refs``) after the model and optimizer exist, so only the
training steps (plus the resident model) count. glibc's malloc keeps freed blocks below its
*dynamic* mmap threshold in the heap, which inflates RSS well past the live tensors (measured +80%
here); the child therefore runs with MALLOC_MMAP_THRESHOLD_=65536 so RSS follows live memory.
It also runs with MALLOC_ARENA_MAX=1: glibc opens a new arena whenever two threads contend for a
lock, so with more than one thread the number of arenas (and the RSS they hold) depends on how
busy the machine is; one arena makes the peak a property of the run, not of the load.
Linux only (reads /proc).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from lorakit.analysis.errors import PlanError
from lorakit.analysis.plan import PlanRequest

MMAP_THRESHOLD = "65536"


@dataclass
class Measured:
    peak_bytes: int  # VmHWM during training − VmRSS before the model was built
    model_bytes: int  # RSS growth from building the model, LoRA and optimizer
    steps: int
    seconds: float


def measure_training_peak(request: PlanRequest, steps: int = 2, threads: int = 2, fixed_mmap_threshold: bool = True,
                          timeout: float = 900) -> Measured:
    """Train `steps` AdamW steps of lorakit LoRA on random tokens in a subprocess; return its peak."""
    if request.quant is not None:
        raise PlanError("measure_training_peak builds the full-precision model only; measure without quant "
                        "(a 4-bit base's figure stays the plan's prediction)")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if fixed_mmap_threshold:
        env.update(MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, MALLOC_ARENA_MAX="1")
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        env.pop("MALLOC_ARENA_MAX", None)
    payload = json.dumps({"request": dataclasses.asdict(request), "steps": steps, "threads": threads})
    proc = subprocess.run([sys.executable, "-m", "lorakit.analysis.measure", payload], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement run failed:\n{proc.stderr[-3000:]}")
    return Measured(**json.loads(proc.stdout.strip().splitlines()[-1]))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(payload: dict) -> Measured:
    import time
    import warnings

    import torch

    from lorakit.analysis.plan import (
        DTYPES,
        build_model,
        enable_checkpointing,
        is_causal_lm,
        load_model_config,
        lora_config,
        step_loss,
    )
    from lorakit.core.model import get_lora_model

    warnings.simplefilter("ignore")
    torch.set_num_threads(payload["threads"])
    request = PlanRequest(**payload["request"])
    config = load_model_config(request.model)
    causal = is_causal_lm(config)
    torch.manual_seed(0)
    input_ids = torch.randint(0, min(getattr(config, "vocab_size", 100), 1000), (request.batch, request.seq))
    build_model(config, DTYPES[request.resolved_dtype()], device="meta")  # import the model's code first:
    rss0 = _status_bytes("VmRSS")  # ~0.1 GB of Python modules is the framework's, not training's
    model = build_model(config, DTYPES[request.resolved_dtype()], device="cpu")
    if request.grad_checkpointing:
        enable_checkpointing(model)
    model = get_lora_model(model, lora_config(request))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rss1 = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    for _ in range(payload["steps"]):
        step_loss(model, input_ids, causal).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return Measured(_status_bytes("VmHWM") - rss0, rss1 - rss0, payload["steps"], seconds)


if __name__ == "__main__":
    result = _child(json.loads(sys.argv[1]))
    print(json.dumps(dataclasses.asdict(result)))
