"""`lorakit demo minilm`: LoRA on the packaged all-MiniLM-L6-v2, two real tasks, no downloads.

For each built-in task (stdlib docstrings -> library area; VADER words -> sentiment) it trains
and scores on the held-out split: a frozen-encoder linear probe, a LoRA adapter (r=8, all linear
layers, the classifier head in modules_to_save) and full fine-tuning. Both adapters are then
loaded onto ONE base model and switched with set_adapter; the demo checks that the reloaded
adapter gives the trained model's outputs, that merged == unmerged, and that a batch mixing both
adapters row by row equals each adapter alone. Adapters, configs and loss.png go to runs/demo/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lorakit.demos.progress import ProgressBar

TASKS = ("docstring-topics", "word-sentiment")
SHARED_WIDTH = 6  # classifier outputs of the shared base: enough for every task (each uses its first k)
# (epochs, max_length) per task, full and --quick; LoRA and full fine-tuning get the same budget
BUDGET = {"docstring-topics": (3, 64), "word-sentiment": (1, 16)}
QUICK_LIMIT = 200  # train and test examples per task in --quick mode


def lora_config(task: str, out: Path, quick: bool, target: str | list[str] = "all-linear") -> dict[str, Any]:
    epochs, max_length = BUDGET[task]
    return {
        "model": {"name_or_path": "minilm", "num_labels": SHARED_WIDTH},
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": target},
        "data": {"train_file": f"builtin:{task}", "eval_file": f"builtin:{task}", "max_length": max_length,
                 "limit": QUICK_LIMIT if quick else None},
        "train": {"output_dir": str(out / task), "epochs": 1 if quick else epochs, "batch_size": 16, "lr": 2e-3,
                  "warmup_ratio": 0.06, "schedule": "linear", "log_every": 5, "seed": 0},
    }


def run_task(task: str, out: Path, quick: bool) -> dict[str, Any]:
    import shutil

    from lorakit.train.baselines import full_finetune, linear_probe
    from lorakit.train.config import load_config
    from lorakit.train.data import pad_id
    from lorakit.train.prepare import prepare_data
    from lorakit.train.presets import load_base, load_tokenizer
    from lorakit.train.trainer import Trainer

    cfg = load_config(raw=lora_config(task, out, quick))
    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)
    tokenizer = load_tokenizer("minilm")
    data = prepare_data(cfg, tokenizer)
    pad = pad_id(tokenizer)
    rows: dict[str, Any] = {}
    probe = linear_probe(load_base("minilm", "classification", SHARED_WIDTH, seed=0), data, pad)
    rows["linear probe"] = {"acc": probe.accuracy, "f1": probe.f1, "params": probe.trainable_params,
                            "s": probe.seconds}
    trainer = Trainer(cfg, reporter=ProgressBar(f"{task} LoRA"), handle_signals=False)  # no --resume: Ctrl-C just stops
    res = trainer.run()
    rows["LoRA r=8"] = {"acc": res.metrics["eval_accuracy"], "f1": res.metrics["eval_f1"],
                        "params": res.trainable_params, "s": res.train_seconds, "tok_s": res.tokens_per_s}
    full = full_finetune(load_base("minilm", "classification", SHARED_WIDTH, seed=0), data, cfg, pad,
                         progress=ProgressBar(f"{task} full FT"))
    rows["full fine-tuning"] = {"acc": full.accuracy, "f1": full.f1, "params": full.trainable_params,
                                "s": full.seconds}
    return {"rows": rows, "trainer": trainer, "data": data, "total": res.total_params,
            "lora_losses": [(r["step"], r["loss"]) for r in trainer.metrics.records if "loss" in r],
            "full_losses": full.losses, "adapter": res.adapter_dir, "n_train": len(data.train),
            "n_test": len(data.eval or [])}


def check_switching(results: dict[str, dict[str, Any]]) -> list[str]:
    """Both adapters on one base: reload == trained, merged == unmerged, mixed batch == each alone."""
    import torch

    from lorakit.core.model import LoraModel
    from lorakit.train.data import collate, pad_id
    from lorakit.train.distributed import DistInfo
    from lorakit.train.evaluate import evaluate
    from lorakit.train.presets import load_base, load_tokenizer

    pad = pad_id(load_tokenizer("minilm"))
    base = load_base("minilm", "classification", SHARED_WIDTH, seed=123)  # head seed differs: must not matter
    first, second = TASKS
    model = LoraModel.from_pretrained(base, results[first]["adapter"], adapter_name=first)
    model.load_adapter(results[second]["adapter"], adapter_name=second)
    model.eval()
    lines, batches, outputs = [], {}, {}
    with torch.no_grad():
        for task in TASKS:  # reload == trained, before any merge touches the shared base weights
            data, trained = results[task]["data"], results[task]["trainer"].model.eval()
            batch = collate(data.eval[:32], pad)
            batches[task] = batch
            model.set_adapter(task)
            got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            want = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            outputs[task] = got
            acc = evaluate(model, data.eval, 64, pad, len(data.labels), DistInfo())["eval_accuracy"]
            lines.append(f"{task}: set_adapter -> reloaded vs trained max|Δlogit| {(got - want).abs().max():.2e}, "
                         f"held-out accuracy {acc:.4f}")
        # one batch, rows routed to different adapters
        a, b = batches[first], batches[second]
        width = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

        def widen(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t[:4], (0, width - t.shape[1]), value=value)

        ids = torch.cat([widen(a["input_ids"], pad), widen(b["input_ids"], pad)])
        mask = torch.cat([widen(a["attention_mask"], 0), widen(b["attention_mask"], 0)])
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=[first] * 4 + [second] * 4).logits
        alone = []
        for task, rows in ((first, slice(0, 4)), (second, slice(4, 8))):
            model.set_adapter(task)
            alone.append(model(input_ids=ids[rows], attention_mask=mask[rows]).logits)
        lines.append(f"mixed batch (4 rows per adapter) vs each adapter alone: max|Δlogit| "
                     f"{(mixed - torch.cat(alone)).abs().max():.2e}")
        for task in TASKS:
            batch = batches[task]
            model.set_adapter(task)
            model.merge_adapter()
            merged = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            model.unmerge_adapter()
            lines.append(f"{task}: merged vs unmerged max|Δlogit| {(merged - outputs[task]).abs().max():.2e}")
    return lines


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), dpi=100)
    for ax, (task, r) in zip(list(axes), results.items()):
        if r["lora_losses"]:
            ax.plot(*zip(*r["lora_losses"]), label="LoRA r=8 (train loss)")
        full = r["full_losses"]
        smooth = [(s, sum(v for _, v in full[max(0, i - 4): i + 1]) / len(full[max(0, i - 4): i + 1]))
                  for i, (s, _) in enumerate(full)]
        ax.plot(*zip(*smooth), label="full fine-tuning (train loss, 5-step mean)", alpha=0.8)
        ax.set_title(task)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(results: dict[str, dict[str, Any]]) -> str:
    head = f"{'task':<18} {'method':<17} {'trainable params':>17} {'% of model':>10} {'accuracy':>9} " \
           f"{'macro-F1':>9} {'time':>7}"
    lines = [head, "-" * len(head)]
    for task, r in results.items():
        for i, (method, row) in enumerate(r["rows"].items()):
            name = f"{task} ({r['n_train']}/{r['n_test']})" if i == 0 else ""
            lines.append(f"{name:<18} {method:<17} {row['params']:>17,} {100 * row['params'] / r['total']:>9.2f}% "
                         f"{row['acc']:>9.4f} {row['f1']:>9.4f} {row['s']:>6.0f}s")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the demo; `args`: quick (bool), out (folder). Threads are the CLI's choice (lorakit.threads)."""
    from lorakit.train.generate import quiet_transformers

    quiet_transformers()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"lorakit demo: all-MiniLM-L6-v2 (22.7M params), tasks {', '.join(TASKS)}"
          + (" [quick: 200 train / 200 test examples, 1 epoch]" if args.quick else ""), flush=True)
    results = {}
    for task in TASKS:
        results[task] = run_task(task, out, args.quick)
        print(f"  {task}: done", flush=True)
    print("\nheld-out split (train/test examples in brackets):\n" + table(results))
    lora_tok_s = [r["rows"]["LoRA r=8"]["tok_s"] for r in results.values()]
    print("LoRA training throughput: " + ", ".join(f"{t} {s:.0f} tokens/s" for t, s in zip(TASKS, lora_tok_s)))
    print("\none base, two adapters:")
    for line in check_switching(results):
        print("  " + line)
    plot(results, out / "loss.png")
    print(f"\nadapters: {', '.join(str(results[t]['adapter']) for t in TASKS)}\nplot: {out / 'loss.png'}\n"
          f"total {time.perf_counter() - started:.0f}s")
    return 0

