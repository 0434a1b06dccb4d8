"""From a TrainConfig's `data` section to encoded train/eval examples (and a report of what was dropped)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorakit.train.config import TrainConfig
from lorakit.train.data import IGNORE, Example, encode_classification, encode_lm, infer_labels, pack
from lorakit.train.records import DataError, read_records


@dataclass
class Prepared:
    train: list[Example]
    eval: list[Example] | None
    format: str
    task: str  # causal_lm or classification (model.task: auto resolved by the data format)
    labels: list[str] | None  # classification label names, in output order
    stats: dict[str, Any] = field(default_factory=dict)  # counts reported to the user


def targets(example: Example) -> int:
    """How many loss terms an example contributes: predicted tokens, or 1 for a class label."""
    if isinstance(example.labels, int):
        return 1
    return sum(1 for v in example.labels[1:] if v != IGNORE)


def prepare_data(cfg: TrainConfig, tokenizer: Any) -> Prepared:
    d = cfg.data
    train = read_records(d.train_file, d.format, d.on_bad_record, d.text_field, d.label_field, "train", d.limit)
    fmt = train.format
    evaluation = None
    if d.eval_file:
        eval_fmt = fmt if d.format == "auto" else d.format
        evaluation = read_records(d.eval_file, eval_fmt, d.on_bad_record, d.text_field, d.label_field, "test",
                                  d.limit)
        if evaluation.format != fmt:
            raise DataError(f"{d.eval_file} looks like {evaluation.format} records but {d.train_file} holds {fmt}; "
                            "set data.format")
    stats: dict[str, Any] = {"train_records": len(train.items), "bad_records": train.bad,
                             "bad_examples": list(train.bad_examples)}
    if evaluation is not None:
        stats.update(eval_records=len(evaluation.items), bad_records=train.bad + evaluation.bad)
        stats["bad_examples"] += evaluation.bad_examples
    task = cfg.model.task if cfg.model.task != "auto" else \
        ("classification" if fmt == "classification" else "causal_lm")
    if task == "classification":
        if fmt != "classification":
            raise DataError(f"model.task is classification but the data is in {fmt} format (needs text/label)")
        labels = d.labels or train.labels or infer_labels(train.items, d.label_field)
        enc = encode_classification(train.items, tokenizer, labels, d.max_length, d.text_field, d.label_field)
        enc_eval = (encode_classification(evaluation.items, tokenizer, labels, d.max_length, d.text_field,
                                          d.label_field) if evaluation else None)
    else:
        labels = None
        enc = encode_lm(train.items, tokenizer, fmt, d.max_length, d.text_field)
        enc_eval = encode_lm(evaluation.items, tokenizer, fmt, d.max_length, d.text_field) if evaluation else None
        if d.packing:
            enc.examples = pack(enc.examples, d.max_length)
    stats.update(truncated=enc.truncated, dropped=enc.dropped, train_examples=len(enc.examples))
    if not enc.examples:
        raise DataError(f"no training example has anything to learn after truncation to {d.max_length} tokens; "
                        "raise data.max_length")
    return Prepared(enc.examples, enc_eval.examples if enc_eval else None, fmt, task, labels, stats)
