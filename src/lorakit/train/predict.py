"""`lorakit predict`: labels from a sequence classifier with a trained adapter.

    lorakit predict --adapter runs/demo/word-sentiment/adapter "wonderful" "dreadful"
    lorakit predict --adapter a --file test.jsonl      # text/label records: also prints accuracy
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def predict_labels(model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[str],
                   max_length: int = 512, batch_size: int = 32) -> list[tuple[str, float]]:
    """(label, probability) per text: softmax over the task's labels (the first len(labels) outputs)."""
    out: list[tuple[str, float]] = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        logits = model(input_ids=enc["input_ids"].to(device),
                       attention_mask=enc["attention_mask"].to(device)).logits[:, : len(labels)]  # (B, k)
        probs = logits.float().softmax(-1)
        best = probs.argmax(-1)
        out += [(labels[int(i)], float(probs[row, i])) for row, i in enumerate(best)]
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="classify texts with a sequence classifier + LoRA adapter",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="*", help="texts to classify")
    p.add_argument("--adapter", required=True, help="adapter folder written by lorakit train")
    p.add_argument("--base", help="base model: preset, checkpoint folder or Hugging Face id (default: from "
                   "training_meta.json)")
    p.add_argument("--file", help="a .jsonl/.csv of text(/label) records, or builtin:<task> (its test split)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import LorakitError
    from lorakit.train.generate import quiet_transformers
    from lorakit.train.model_setup import load_trained
    from lorakit.train.records import read_records

    quiet_transformers()
    try:
        model, tokenizer, meta = load_trained(args.adapter, args.base)
        labels = meta.get("labels")
        if meta.get("task") != "classification" or not labels:
            raise LorakitError(f"{args.adapter} is not a classifier adapter trained by lorakit; "
                               "use lorakit generate for causal LMs")
        texts, gold = list(args.text), []
        if args.file:
            records = read_records(args.file, "classification", split="test")
            texts += [r.fields["text"] for r in records.items]
            gold = [str(labels[v]) if isinstance(v, int) else v for v in (r.fields["label"] for r in records.items)]
        if not texts:
            raise LorakitError("give texts to classify, or --file")
        preds = predict_labels(model, tokenizer, texts, labels, meta.get("max_length", 512), args.batch_size)
        for text, (label, prob) in zip(texts, preds):
            print(f"{label}\t{prob:.3f}\t{text}")
        if gold:
            scored = preds[len(preds) - len(gold):]
            acc = sum(p == g for (p, _), g in zip(scored, gold)) / len(gold)
            print(f"accuracy {acc:.4f} on {len(gold)} labelled records", file=sys.stderr)
    except (LorakitError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
