"""`lorakit demo` (`make demo`): the built-in end-to-end jobs, no downloads.

    lorakit demo            # = lorakit demo llm: SmolLM2-135M-Instruct, LoRA vs QLoRA, served (~10 min on 2 cores)
    lorakit demo --quick    # the same, smaller (~3 min)
    lorakit demo minilm     # MiniLM: LoRA vs linear probe vs full fine-tuning on two classification tasks

llm: fine-tunes SmolLM2-135M-Instruct with LoRA to name the exception a Python expression raises
(data generated and labelled by this Python), scores base / LoRA / QLoRA (NF4 base, double quant)
on held-out expressions by greedy generation and held-out loss, shows before/after answers, then
serves the adapter with `lorakit serve` and asks it one held-out question through the `openai`
client. Every stage's time is printed.
"""

from __future__ import annotations

import argparse
import sys

JOBS = {"llm": "lorakit.demos.llm", "minilm": "lorakit.demos.minilm"}
DEFAULT_OUT = {"llm": "runs/demo-llm", "minilm": "runs/demo"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="end-to-end demos: SmolLM2 LoRA/QLoRA + serving (llm), MiniLM (minilm)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", nargs="?", choices=sorted(JOBS), default="llm", help="which demo (default: llm)")
    p.add_argument("--quick", action="store_true",
                   help="llm: fewer steps and held-out examples (~3 min); minilm: 200 examples per task, 1 epoch")
    p.add_argument("--out", help="where adapters, data and plots go (default: runs/demo-llm or runs/demo)")
    p.add_argument("--steps", type=int, help="llm: optimizer steps per training run (default 40, --quick 12)")
    p.add_argument("--held-out", type=int, help="llm: held-out expressions to score (default 60, --quick 24)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import importlib

    args.out = args.out or DEFAULT_OUT[args.job]
    if args.job != "llm" and (args.steps or args.held_out):
        print("lorakit demo: --steps and --held-out are options of the llm demo", file=sys.stderr)
        return 2
    for name in ("steps", "held_out"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"lorakit demo: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    return importlib.import_module(JOBS[args.job]).main(args)
