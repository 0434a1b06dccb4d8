"""AdamW over the trainable parameters only, with LoRA+ and weight-decay groups, and the lr schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


def param_groups(model: nn.Module, lr: float, weight_decay: float, loraplus_ratio: float = 1.0) -> list[dict]:
    """Four groups: (B factor or not) × (decayed or not); frozen parameters are left out.

    LoRA+ (Hayou et al. 2024): ``lr_B = lr × ratio`` for every ``*.lora_b``. Weight decay applies
    to matrices only; biases and norm weights (1-D) are not decayed.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    names: dict[tuple[bool, bool], list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.endswith(".lora_b"), p.ndim >= 2)
        groups.setdefault(key, []).append(p)
        names.setdefault(key, []).append(name)
    out = []
    for (is_b, decayed), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr": lr * (loraplus_ratio if is_b else 1.0),
            "weight_decay": weight_decay if decayed else 0.0,
            "names": names[(is_b, decayed)],
        })
    return out


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, loraplus_ratio: float,
                    betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    groups = param_groups(model, lr, weight_decay, loraplus_ratio)
    if not groups:
        raise ValueError("the model has no trainable parameters; check lora.target_modules")
    for g in groups:
        g["initial_lr"] = g["lr"]
    # foreach=False: one code path on every device, so resumed runs replay bit for bit
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)


@dataclass
class Schedule:
    """lr factor at a step: linear warm-up, then cosine / linear decay to min_ratio, or constant.

    cosine: ``f(t) = m + (1 - m)·½(1 + cos(π·p))`` with ``p = (t - w)/(T - w)``, m = min_ratio.
    """

    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_ratio: float = 0.0

    def factor(self, step: int) -> float:
        """Factor for the update that ends optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        if self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for this step; returns the base group's lr."""
        f = self.factor(step)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        return optimizer.param_groups[0]["initial_lr"] * f

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "kind": self.kind,
                "min_ratio": self.min_ratio}
