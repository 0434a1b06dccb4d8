"""`lorakit train CONFIG.yaml [--set key=value ...] [--resume]` (also under torchrun)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from lorakit.train.config import describe_keys

HELP = """Fine-tune a LoRA adapter from a YAML config.

  lorakit train examples/tiny_llama_instruction.yaml
  lorakit train cfg.yaml --set train.lr=1e-4 --set lora.r=16
  lorakit train cfg.yaml --resume            # after a crash or kill: continue from the last checkpoint
  (Ctrl-C or SIGTERM: finishes the current step, writes a checkpoint, prints the command to resume)
  torchrun --nproc_per_node 2 -m lorakit train cfg.yaml     # data-parallel (gloo on CPU, NCCL on GPU)
  torchrun --nproc_per_node 2 -m lorakit train cfg.yaml --set train.parallel=fsdp   # sharded (FSDP2)
  torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --master_addr HOST --master_port 29500 \
      -m lorakit train cfg.yaml                             # on each of 2 machines (R = 0, 1)

The run folder (train.output_dir) receives config.yaml (resolved), metrics.jsonl, loss.png,
checkpoints/step-N/ and adapter/ (PEFT format + tokenizer + training_meta.json).
"""


class TqdmReporter:
    """Progress bar with loss, lr, tokens/s and ETA (tqdm's own) on stderr; main process only."""

    def __init__(self, enabled: bool = True, bar: bool = True):
        self.enabled = enabled  # False on ranks other than 0: they stay silent
        self.show_bar = enabled and bar
        self.bar: Any = None

    def start(self, total_steps: int, done_steps: int) -> None:
        if self.show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=done_steps, unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, step: int, info: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}",
                                 tok_s=f"{info['tok/s']:.0f}", refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="fine-tune a LoRA adapter from a YAML config",
        description=HELP, epilog="CONFIG KEYS (section.key (type; default) and why):\n\n" + describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML file with model/quant/lora/data/train sections")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=1e-4 (value parsed as YAML); repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in train.output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import LorakitError, one_line
    from lorakit.train.config import load_config
    from lorakit.train.generate import quiet_transformers

    quiet_transformers()
    try:
        cfg = load_config(args.config, args.overrides)
    except LorakitError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    try:  # importing torch and transformers takes seconds: a Ctrl-C then is no traceback either
        from lorakit.train.interrupt import TrainingInterrupted
        from lorakit.train.trainer import train
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130

    main = int(os.environ.get("RANK", "0")) == 0
    reporter = TqdmReporter(enabled=main, bar=not args.no_progress)
    try:
        result = train(cfg, resume=args.resume, reporter=reporter)
    except TrainingInterrupted as exc:
        reporter.close()
        if main:
            resume = exc.checkpoint is not None
            print(f"{exc}; {'resume with' if resume else 'start again with'}: {rerun_command(args, resume)}",
                  file=sys.stderr)
        return exc.exit_code
    except LorakitError as exc:
        reporter.close()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    if main:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        print(f"done: {result.steps} steps, {result.tokens_per_s:.0f} tokens/s"
              + (f"; {metrics}" if metrics else "") + f"\nadapter: {result.adapter_dir}")
    return 0


def rerun_command(args: argparse.Namespace, resume: bool) -> str:
    """The shell command that continues (or restarts) this run: same config, same --set overrides."""
    argv = ["train", args.config]
    for item in args.overrides:
        argv += ["--set", item]
    if args.no_progress:
        argv.append("--no-progress")
    if resume:
        argv.append("--resume")
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world > 1 and world == local:  # torchrun on one machine: resume the same way
        return shlex.join(["torchrun", "--standalone", "--nproc_per_node", str(local), "-m", "lorakit", *argv])
    if world > 1:  # several machines: their rendezvous options are not ours to know
        return "your torchrun command on every node with -m " + shlex.join(["lorakit", *argv])
    return shlex.join(["lorakit", *argv])
