"""`lorakit bench`: lorakit vs PEFT / bitsandbytes, side by side in one run, as ratios."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time


def register(subparsers) -> None:
    from lorakit.threads import THREADS_HELP

    p = subparsers.add_parser(
        "bench",
        help="benchmark lorakit against PEFT and bitsandbytes (ratios measured in one run)",
        description="Times LoRA training, inference, mixed-adapter batches, adapter loading, NF4 and the QLoRA "
        "step (fp32 and bf16 compute) against PEFT and bitsandbytes on the same random-initialised Llama models, "
        "in one process, interleaved, and prints ratios with their targets. With --model, the same on a real "
        "pretrained checkpoint (train step and peak RSS vs PEFT and the floor, fp32 QLoRA vs PEFT + bitsandbytes, "
        "greedy decode and serving tokens/s). Needs the [dev] extras (peft, bitsandbytes).",
    )
    p.add_argument("--quick", action="store_true", help="fewer repeats, skip the wide model and the memory runs")
    p.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP + "; use 1 for ratios on a shared machine")
    p.add_argument("--only", nargs="*", default=None,
                   choices=["train", "wide", "memory", "inference", "mixed", "loading", "nf4", "qlora", "decode", "serve"],
                   help="run only these sections (with --model: train, memory, qlora, decode, serve)")
    p.add_argument("--model", metavar="BASE",
                   help="benchmark this real causal LM instead of the random Llamas: a preset "
                        "(smollm2-135m-instruct), checkpoint folder or hub id; all-linear r=16, batch 1 x 256 tokens, "
                        "32 greedy tokens per request")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit.bench import suite

    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 5
    sections = args.only or ["train", "wide", "memory", "inference", "mixed", "loading", "nf4", "qlora"]
    if args.quick and args.only is None:
        sections = [s for s in sections if s not in ("wide", "memory")]
    plan = {
        "train": lambda: suite.train_steps("llama-512x8", repeats),
        "wide": lambda: suite.train_steps("llama-2048x2", max(2, repeats - 2)),
        "memory": lambda: suite.peak_memory("llama-512x8", args.threads),
        "inference": lambda: suite.inference(repeats * 2),
        "mixed": lambda: suite.mixed_batches(repeats * 2 if args.quick else repeats * 3),
        "loading": lambda: suite.adapter_loading(50),
        "nf4": lambda: suite.nf4(repeats * 2),
        "qlora": lambda: suite.qlora_step(repeats),
    }
    if args.model:
        sections, plan = _real_plan(args, repeats)
    elif set(sections) - set(plan):
        raise SystemExit(f"lorakit bench: --only {' '.join(sorted(set(sections) - set(plan)))} needs --model")
    rows = []
    started = time.time()
    for name in sections:
        print(f"== {name} ...", file=sys.stderr, flush=True)
        section_rows = plan[name]()
        for row in section_rows:
            _print_row(row)
        rows += section_rows
    print(f"\n{_machine()} | {len(rows)} figures in {time.time() - started:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": _machine(), "date": datetime.date.today().isoformat(),
                       "command": " ".join(sys.argv), "rows": [r.as_dict() for r in rows]}, fh, indent=2)
    return 0


def _real_plan(args: argparse.Namespace, repeats: int):
    """Sections and their functions for --model (a real checkpoint)."""
    from lorakit.bench import real

    path = real.model_dir(args.model)
    real_sections = ["train", "memory", "qlora", "decode", "serve"]
    unknown = sorted(set(args.only or []) - set(real_sections))
    if unknown:
        raise SystemExit(f"lorakit bench: --only {' '.join(unknown)} has no --model version; "
                         f"choose from {' '.join(real_sections)}")
    sections = [s for s in real_sections if s in (args.only or real_sections)]
    if args.quick and args.only is None:
        sections = [s for s in sections if s != "memory"]
    repeats = max(2, repeats - 2)  # real-model steps take seconds each
    wanted = tuple(s for s in sections if s in ("decode", "serve"))
    if wanted:  # decode and serve share one set of loaded models and engines, interleaved together
        sections = [s for s in sections if s not in wanted] + ["+".join(wanted)]
    plan = {
        "train": lambda: real.train_steps(path, repeats),
        "memory": lambda: real.peak_memory(path, args.threads),
        "qlora": lambda: real.qlora_step(path, repeats),
        "+".join(wanted): lambda: real.decode_and_serve(path, repeats + 1, wanted),
    }
    return sections, plan


def _print_row(row) -> None:
    met = {True: "met", False: "NOT met", None: ""}[row.met]
    fmt = {"s": "{:.4f}", "tok/s": "{:.1f}"}.get(row.unit, "{:.0f}")
    wall = f"  (wall clock {row.wall_ratio:.3f})" if row.wall_ratio is not None else ""
    print(f"{row.figure:<68} {fmt.format(row.ours):>10} {row.unit} vs {fmt.format(row.reference):>10} "
          f"({row.ref_name})  ratio {row.ratio:6.3f}  {row.target:>8} {met}{wall}", flush=True)


def _machine() -> str:
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
