"""Per-process peak memory of LoRA training under torchrun (train.parallel: fsdp / ddp), beside `lorakit plan`.

    PYTHONPATH=src python benchmarks/bench_fsdp_memory.py [--processes 1 2 4] [--quant none nf4]
        [--model smollm2-135m-instruct] [--steps 2] [--seq 128]

Model: by default a 4-layer Llama-512 (hidden 512, intermediate 1536, 8 heads, vocab 8000, untied
head), random init; with --model, any base lorakit.models.resolve_base takes (a preset such as
smollm2-135m-instruct, a checkpoint folder), loaded from its checkpoint as ``lorakit train`` loads it
(lorakit.train.presets.load_base). fp32; LoRA r16 on all linear layers; each process trains
--steps AdamW steps (2) on --batch × --seq random tokens (1 × 128).
Method as lorakit.analysis.measure (the 1-process planner check): in every process, peak =
VmHWM during the steps − VmRSS before the model is built; VmHWM is reset once the model is built,
quantised, wrapped, sharded and the optimizer exists. One difference: the baseline is taken after a
warm-up, the same steps on a 1-block, 256-token-vocabulary copy of the model (built, quantised,
sharded, trained, then freed), so that the framework's one-time costs (library code paged in, the
autograd engine, gloo and FSDP state) are in the baseline, as the planner excludes the framework.
The "raw" column is the peak above the RSS before that warm-up; "resident" is the RSS the built
(sharded) model and optimizer hold before the first step, above the baseline. MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_ARENA_MAX=1 make RSS follow live
tensors; one thread per process. "load" is the VmHWM before that reset: every process builds the
whole fp32 base before sharding it, so loading still peaks at the whole model.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def build(config, args, info, folder: str | None = None):  # noqa: ANN001, ANN201
    import torch

    import lorakit
    from lorakit.analysis.plan import build_model
    from lorakit.train import distributed
    from lorakit.train.presets import load_base

    # a real checkpoint is loaded the way `lorakit train` loads its base; the default model is random init
    model = load_base(folder, mmap=args.quant == "none") if folder else build_model(config, torch.float32, device="cpu")
    model.train()
    if args.quant == "nf4":
        lorakit.quantize_model(model, "nf4", double_quant=True, skip=("lm_head",))
    model = lorakit.get_lora_model(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    if info.enabled and args.parallel == "fsdp":
        distributed.shard_model(model, info)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=1e-4)


def train_steps(model, params, optimizer, input_ids, info, steps: int = 2) -> None:  # noqa: ANN001
    from lorakit.analysis.plan import step_loss
    from lorakit.train import distributed
    from lorakit.train.trainer import clip_gradients

    for _ in range(steps):
        step_loss(model, input_ids, True).backward()
        distributed.all_reduce_grads(params, info)
        clip_gradients(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def worker(args: argparse.Namespace) -> None:
    import warnings

    import torch

    from lorakit.analysis.plan import build_model, load_model_config
    from lorakit.train import distributed

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    info = distributed.setup("cpu")
    config = load_model_config(args.model)
    build_model(config, torch.float32, device="meta")  # import the modelling code before the baseline
    torch.manual_seed(0)
    input_ids = torch.randint(0, 1000, (args.batch, args.seq))
    raw0 = status_bytes("VmRSS")
    small = copy.deepcopy(config)
    small.num_hidden_layers, small.vocab_size = 1, 256
    train_steps(*build(small, args, info), input_ids % 256, info, args.steps)  # warm-up; everything it built is freed
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := current RSS, so "load" is the model's own build
    rss0 = status_bytes("VmRSS")
    weights = args.model if args.load and any(Path(args.model).glob("*.safetensors")) else None
    model, params, optimizer = build(config, args, info, weights)
    load = status_bytes("VmHWM") - rss0
    resident = status_bytes("VmRSS") - rss0
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := current RSS
    train_steps(model, params, optimizer, input_ids, info, args.steps)
    hwm = status_bytes("VmHWM")
    rows = distributed.gather_objects({"rank": info.rank, "peak": hwm - rss0, "raw": hwm - raw0, "load": load,
                                       "resident": resident},
                                      info)
    if info.is_main:
        Path(args.out).write_text(json.dumps(rows))
    distributed.teardown(info)


def planned(model: str, processes: int, parallel: str, quant: str, batch: int, seq: int) -> int:
    from lorakit.analysis.plan import PlanRequest, plan_memory

    request = PlanRequest(model, r=16, quant=None if quant == "none" else quant, batch=batch, seq=seq,
                          dtype="float32", processes=processes, parallel=parallel)
    return plan_memory(request).total_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quant", nargs="+", default=["none", "nf4"])
    parser.add_argument("--parallel", default="fsdp", choices=["fsdp", "ddp"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="AdamW steps per process (2)")
    parser.add_argument("--model", help="a base lorakit.models.resolve_base takes (a preset such as "
                        "smollm2-135m-instruct, or a checkpoint folder); default: a random 4-layer Llama-512")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.quant = args.quant[0]  # one value per worker run
        worker(args)
        return 0
    from transformers import LlamaConfig

    from lorakit.models import resolve_base

    work = tempfile.mkdtemp(prefix="fsdpmem-")
    if args.model:
        folder, load = str(resolve_base(args.model)), ["--load"]
    else:
        folder, load = work, []
        LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=8, vocab_size=8000, tie_word_embeddings=False,
                    architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="1")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    print(f"| base | {args.parallel} processes | planned MiB / process | measured MiB / process (max over ranks) "
          "| error | resident model MiB (max) | raw MiB (max) | load peak MiB (max) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for quant in args.quant:
        for n in args.processes:
            out = Path(work) / f"{quant}-{n}.json"
            cmd = [torchrun, "--standalone", "--nproc_per_node", str(n), __file__, "--worker", "--model", folder,
                   "--quant", quant, "--parallel", args.parallel, "--batch", str(args.batch), "--seq",
                   str(args.seq), "--steps", str(args.steps), "--out", str(out), *load]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-3000:])
            rows = json.loads(out.read_text())
            measured = max(r["peak"] for r in rows)
            plan = planned(folder, n, args.parallel, quant, args.batch, args.seq)
            label = "fp32" if quant == "none" else "nf4 (double quant)"
            print(f"| {label} | {n} | {plan / MIB:.1f} | {measured / MIB:.1f} | "
                  f"{100 * (plan - measured) / measured:+.1f}% | {max(r['resident'] for r in rows) / MIB:.1f} "
                  f"| {max(r['raw'] for r in rows) / MIB:.1f} "
                  f"| {max(r['load'] for r in rows) / MIB:.1f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
