"""`lorakit inspect | compress | combine | plan`: the analysis commands.

Heavy imports (torch, transformers, matplotlib) happen inside the handlers so `lorakit --help`
stays fast. Bad input prints one line to stderr and exits 2; no traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable
from typing import Any

EXIT_BAD_INPUT = 2
METHODS = ("linear", "concat", "svd", "ties", "dare")  # = lorakit.analysis.combine.METHODS, without torch


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add inspect, compress, combine and plan (each once, however often this is called)."""
    for name, add in (("inspect", _add_inspect), ("compress", _add_compress), ("combine", _add_combine),
                      ("plan", _add_plan)):
        if name not in subparsers.choices:
            add(subparsers)


def main(argv: list[str] | None = None) -> int:
    """Run one analysis command without the rest of the lorakit CLI (used by the tests)."""
    parser = argparse.ArgumentParser(prog="lorakit")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _user_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from lorakit.errors import LorakitError

        try:
            return handler(args)
        except (LorakitError, ValueError, OSError) as exc:
            print(f"lorakit {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return run


def _dump(obj: Any) -> None:
    print(json.dumps(obj, indent=2, allow_nan=False))


def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# ---------------------------------------------------------------------------------------- inspect
def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="per-layer norms, singular values and effective rank of an adapter")
    p.add_argument("adapter", help="PEFT-format adapter folder")
    p.add_argument("--base", help="base model for ‖ΔW‖/‖W0‖: checkpoint folder (safetensors), preset "
                   "(smollm2-135m-instruct, minilm) or Hugging Face id")
    p.add_argument("--plot", metavar="OUT.png", help="write spectra and norms per layer as a PNG")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--compare", metavar="OTHER", help="another adapter: per-layer cosine similarity of ΔW")
    p.set_defaults(func=_user_errors(_run_inspect))


def _run_inspect(args: argparse.Namespace) -> int:
    from lorakit.analysis.inspect import compare_adapters, inspect_adapter

    stats = inspect_adapter(args.adapter, base=args.base)
    comparison = compare_adapters(args.adapter, args.compare) if args.compare else None
    if args.plot:
        from lorakit.analysis.plot import plot_stats

        plot_stats(stats, args.plot)
    if args.json:
        out = stats.to_dict()
        if comparison is not None:
            out["comparison"] = comparison.to_dict()
        _dump(out)
        return 0
    print(f"adapter {stats.path}: r={stats.r} lora_alpha={stats.lora_alpha} rslora={stats.use_rslora} "
          f"layers={len(stats.layers)} params={stats.num_params:,}")
    width = max(len(lay.name) for lay in stats.layers)
    print(f"{'layer':<{width}}  {'kind':<9} {'shape':>11} {'rank':>4} {'scaling':>8} {'‖ΔW‖':>9} "
          f"{'/‖W0‖':>9} {'eff90':>5} {'eff99':>5} {'σ1':>9}")
    for lay in stats.layers:
        shape = f"{lay.shape[0]}x{lay.shape[1]}"
        top = lay.singular_values[0] if lay.singular_values else 0.0
        print(f"{lay.name:<{width}}  {lay.kind:<9} {shape:>11} {lay.rank:>4} {_fmt(lay.scaling):>8} "
              f"{_fmt(lay.norm):>9} {_fmt(lay.relative_norm):>9} {lay.effective_rank_90:>5} "
              f"{lay.effective_rank_99:>5} {_fmt(top):>9}")
    print("summary: " + ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in stats.summary.items()))
    if comparison is not None:
        print(f"\ncosine similarity of ΔW vs {comparison.path_b}:")
        for row in comparison.layers:
            print(f"{row.name:<{width}}  {_fmt(row.cosine, '+.4f')}")
        print(f"mean {_fmt(comparison.mean_cosine, '+.4f')}, overall {_fmt(comparison.overall_cosine, '+.4f')}")
        for path, names in ((comparison.path_a, comparison.only_in_a), (comparison.path_b, comparison.only_in_b)):
            if names:
                print(f"only in {path}: {', '.join(names)}")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


# ---------------------------------------------------------------------------------------- compress
def _add_compress(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="lower an adapter's rank by truncated SVD of each layer's ΔW")
    p.add_argument("adapter", help="PEFT-format adapter folder")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=int, help="keep this many singular directions in every layer")
    how.add_argument("--energy", type=float, help="per layer, keep the fewest directions holding this "
                     "fraction of Σσ² (e.g. 0.99)")
    p.add_argument("--out", required=True, help="folder for the compressed adapter")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_user_errors(_run_compress))


def _run_compress(args: argparse.Namespace) -> int:
    from lorakit.analysis.compress import compress

    report = compress(args.adapter, args.out, rank=args.rank, energy=args.energy)
    if args.json:
        _dump(report.to_dict())
        return 0
    width = max(len(lay.name) for lay in report.layers)
    print(f"{'layer':<{width}}  {'rank':>9} {'rel.error':>10} {'energy':>8}")
    for lay in report.layers:
        print(f"{lay.name:<{width}}  {lay.old_rank:>4}->{lay.new_rank:<4} {lay.relative_error:>10.4g} "
              f"{lay.energy_kept:>8.4f}")
    print(f"params {report.old_params:,} -> {report.new_params:,}; max relative error "
          f"{report.max_relative_error:.4g}; written to {report.out}")
    return 0


# ---------------------------------------------------------------------------------------- combine
def _add_combine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("combine", help="merge several adapters into one (weighted sum, concat, SVD, TIES, DARE)")
    p.add_argument("adapters", nargs="+", help="PEFT-format adapter folders, all on the same layers")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1/n each)")
    p.add_argument("--method", choices=METHODS, default="linear",
                   help="concat: exact, rank Σr; linear: exact weighted sum at its numerical rank; svd: weighted "
                   "sum truncated to --rank; ties/dare: dense merge then truncated to --rank")
    p.add_argument("--rank", type=int, help="output rank for svd/ties/dare (default: largest input rank)")
    p.add_argument("--density", type=float, help="ties: fraction kept per adapter; dare: keep probability p")
    p.add_argument("--seed", type=int, default=0, help="dare's random drop masks")
    p.add_argument("--out", required=True, help="folder for the combined adapter")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_user_errors(_run_combine))


def _run_combine(args: argparse.Namespace) -> int:
    from lorakit.analysis.combine import combine

    report = combine(args.adapters, args.out, weights=args.weights, method=args.method, rank=args.rank,
                     density=args.density, seed=args.seed)
    if args.json:
        _dump(report.to_dict())
        return 0
    width = max(len(lay.name) for lay in report.layers)
    print(f"{args.method} of {len(report.sources)} adapters, weights {report.weights}")
    print(f"{'layer':<{width}}  {'rank':>5} {'rel.error':>10}")
    for lay in report.layers:
        print(f"{lay.name:<{width}}  {lay.rank:>5} {lay.relative_error:>10.4g}")
    print(f"written to {report.out}")
    return 0


# ---------------------------------------------------------------------------------------- plan
def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="parameter counts and peak-memory estimate of a LoRA training run")
    p.add_argument("--model", required=True, help="transformers checkpoint/config folder, a preset "
                   "(tiny-llama, minilm, smollm2-135m-instruct) or a Hugging Face id (org/name)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--target", default="all-linear", help="'all-linear', comma-separated module-name suffixes "
                   "(q_proj,v_proj), or a regex matched against full module names")
    p.add_argument("--quant", choices=["none", "nf4"], default="none", help="4-bit (QLoRA) base weights")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="base weight / compute dtype (default float32; bfloat16 with --quant nf4)")
    p.add_argument("--processes", type=int, default=1, help="torchrun processes; the estimate is per process "
                   "and --batch is each process's")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="with --processes > 1: ddp = the "
                   "whole model in each process, fsdp = sharded as train.parallel: fsdp does")
    p.add_argument("--budget-gb", type=float, help="memory available (GiB); advice is given if the plan exceeds it")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_user_errors(_run_plan))


def _run_plan(args: argparse.Namespace) -> int:
    from lorakit.analysis.plan import PlanRequest, advise, format_plan, parse_target, plan_memory

    request = PlanRequest(model=args.model, r=args.r, target=parse_target(args.target), quant=None if args.quant == "none" else args.quant,
                          batch=args.batch, seq=args.seq, grad_checkpointing=args.grad_checkpointing,
                          dtype=args.dtype, processes=args.processes, parallel=args.parallel)
    plan = plan_memory(request)
    advice = advise(request, plan, args.budget_gb) if args.budget_gb is not None else []
    if args.json:
        _dump({**plan.to_dict(), "budget_gb": args.budget_gb, "advice": advice})
    else:
        print(format_plan(plan))
        for line in advice:
            print(line)
    return 0
