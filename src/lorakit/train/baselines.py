"""The two references a LoRA classifier is judged against (used by `lorakit demo`).

* linear probe: the encoder frozen, only a linear layer on its mean-pooled token embeddings
  trained (the sentence embedding all-MiniLM-L6-v2 was trained to produce, so the strongest
  frozen baseline): ``p(y|x) = softmax(W · mean_t(h_t) + b)``;
* full fine-tuning: every weight trained, with the same data order, batch size, loss and
  evaluation as the LoRA run, and the lr usual for full fine-tuning of BERT-size models.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from lorakit.train.config import TrainConfig
from lorakit.train.data import Example, collate, epoch_batches, eval_batches
from lorakit.train.distributed import DistInfo
from lorakit.train.evaluate import evaluate, macro_f1, summed_loss
from lorakit.train.optim import Schedule
from lorakit.train.prepare import Prepared


@dataclass
class BaselineResult:
    accuracy: float
    f1: float
    trainable_params: int
    seconds: float
    losses: list[tuple[int, float]]  # (step, train loss)


@torch.no_grad()
def mean_pooled(model: nn.Module, examples: list[Example], pad: int, batch_size: int = 64) -> torch.Tensor:
    """(N, H) mean of the last hidden states over real tokens, in the examples' order."""
    encoder = model.base_model
    out = torch.empty(len(examples), model.config.hidden_size)
    for rows in eval_batches([len(e.input_ids) for e in examples], batch_size):
        batch = collate([examples[i] for i in rows], pad)
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        out[rows] = (hidden * mask).sum(1) / mask.sum(1)  # (B, H)
    return out


def linear_probe(model: nn.Module, data: Prepared, pad: int, epochs: int = 300, lr: float = 1e-2,
                 seed: int = 0) -> BaselineResult:
    """Full-batch AdamW on a linear layer over frozen mean-pooled features."""
    start = time.perf_counter()
    model.eval()
    k = len(data.labels or [])
    x_train, x_test = mean_pooled(model, data.train, pad), mean_pooled(model, data.eval or [], pad)
    y_train = torch.tensor([e.labels for e in data.train])
    y_test = torch.tensor([e.labels for e in data.eval or []])
    torch.manual_seed(seed)
    head = nn.Linear(x_train.shape[1], k)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    losses = []
    for step in range(epochs):
        loss = nn.functional.cross_entropy(head(x_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((step + 1, loss.item()))
    with torch.no_grad():
        pred = head(x_test).argmax(-1)
    confusion = torch.zeros(k, k)
    confusion.index_put_((y_test, pred), torch.ones(len(y_test)), accumulate=True)
    return BaselineResult(float((pred == y_test).float().mean()), macro_f1(confusion),
                          sum(p.numel() for p in head.parameters()), time.perf_counter() - start, losses)


def full_finetune(model: nn.Module, data: Prepared, cfg: TrainConfig, pad: int, lr: float = 1e-4,
                  head_lr: float | None = None, weight_decay: float = 0.01, progress: Any = None) -> BaselineResult:
    """Every parameter trained: the reference LoRA should come close to.

    The new (random) classifier head learns at `head_lr` (default: the LoRA run's lr, as the LoRA
    run's head does), the pretrained encoder at `lr`.
    """
    start = time.perf_counter()
    tc, num_labels = cfg.train, len(data.labels or [])
    for p in model.parameters():
        p.requires_grad_(True)
    params = list(model.parameters())
    head = [p for n, p in model.named_parameters() if n.split(".")[0] in ("classifier", "score")]
    body = [p for n, p in model.named_parameters() if n.split(".")[0] not in ("classifier", "score")]
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": head_lr or tc.lr}],
                            weight_decay=weight_decay)
    lengths = [len(e.input_ids) for e in data.train]
    per_epoch = math.ceil(len(data.train) / tc.batch_size)
    total = max(1, math.ceil(tc.epochs * per_epoch))
    schedule = Schedule(total, int(tc.warmup_ratio * total), tc.schedule)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    torch.manual_seed(tc.seed)
    model.train()
    losses, step, epoch = [], 0, 0
    if progress is not None:
        progress.start(total, 0)
    while step < total:
        for rows in epoch_batches(lengths, tc.batch_size, tc.seed, epoch, cfg.data.group_by_length):
            if step >= total:
                break
            batch = collate([data.train[i] for i in rows], pad)
            schedule.apply(opt, step)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = summed_loss(logits, batch["labels"], num_labels) / len(rows)
            loss.backward()
            if tc.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append((step, loss.item()))
            if progress is not None:
                progress.update(step, {"loss": loss.item(), "lr": lr * schedule.factor(step - 1), "tok/s": 0.0})
        epoch += 1
    if progress is not None:
        progress.close()
    metrics = evaluate(model, data.eval or [], 64, pad, num_labels, DistInfo())
    return BaselineResult(metrics["eval_accuracy"], metrics["eval_f1"], sum(p.numel() for p in params),
                          time.perf_counter() - start, losses)
