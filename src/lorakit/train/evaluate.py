"""Summed losses (the trainer divides by the global count) and evaluation metrics.

Causal LM: ``loss = Σ_t CE(logits_t, y_{t+1})`` over unmasked targets; perplexity = exp(mean loss).
Classification: ``loss = Σ_i CE(logits_i[:k], y_i)`` over the task's k labels; accuracy and
macro-F1 (F1 averaged over the classes that occur in the labels or the predictions).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lorakit.train import distributed
from lorakit.train.data import IGNORE, Example, collate, eval_batches


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int | None) -> torch.Tensor:
    if num_labels is not None:  # classification: logits (B, C), labels (B,)
        return F.cross_entropy(logits[:, :num_labels].float(), labels, reduction="sum")
    # causal LM: position t predicts token t+1; logits (B, T, V), labels (B, T)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def macro_f1(confusion: torch.Tensor) -> float:
    """confusion[i, j] = count of true class i predicted as j."""
    tp = confusion.diag().double()
    fp = confusion.sum(0).double() - tp
    fn = confusion.sum(1).double() - tp
    present = (confusion.sum(0) + confusion.sum(1)) > 0
    f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    return float(f1[present].mean()) if present.any() else 0.0


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad: int,
             num_labels: int | None, info: distributed.DistInfo, dtype: str = "float32") -> dict[str, float]:
    """Eval loss and perplexity (LM) or loss, accuracy and macro-F1 (classification), over all processes."""
    was_training = model.training
    model.eval()
    batches = eval_batches([len(e.input_ids) for e in examples], batch_size)
    width = num_labels or 1
    confusion = torch.zeros(width, width, dtype=torch.float64)
    sums = torch.zeros(2, dtype=torch.float64)  # (loss sum, target count)
    # sharded (FSDP): every process runs as many forwards as the busiest one; the extra ones are dropped
    rounds = -(-len(batches) // info.world_size) * info.world_size if info.sharded else len(batches)
    for batch_index in range(info.rank, rounds, info.world_size):
        batch = collate([examples[i] for i in batches[min(batch_index, len(batches) - 1)]], pad)
        batch = {k: v.to(info.device) for k, v in batch.items()}
        with autocast(info.device, dtype):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if batch_index >= len(batches):
            continue
        labels = batch["labels"]
        sums[0] += summed_loss(logits, labels, num_labels).double().cpu()
        if num_labels is not None:
            sums[1] += labels.numel()
            pred = logits[:, :num_labels].argmax(-1)
            confusion.index_put_((labels.cpu(), pred.cpu()), torch.ones(labels.numel(), dtype=torch.float64),
                                 accumulate=True)
        else:
            sums[1] += (labels[:, 1:] != IGNORE).sum().cpu()
    packed = torch.cat([sums, confusion.flatten()]).to(info.device)
    packed = distributed.all_reduce_sum(packed, info).cpu()
    sums, confusion = packed[:2], packed[2:].view(width, width)
    model.train(was_training)
    loss = float(sums[0] / sums[1].clamp(min=1))
    if num_labels is None:
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    return {"eval_loss": loss, "eval_accuracy": float(confusion.diag().sum() / confusion.sum().clamp(min=1)),
            "eval_f1": macro_f1(confusion)}
