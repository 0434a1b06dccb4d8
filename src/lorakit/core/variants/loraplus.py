"""LoRA+ (Hayou et al. 2024): train B with a larger learning rate than A.

    η_B = ratio · η_A        (the paper suggests ratio ≈ 16)

:func:`param_groups` returns optimizer parameter groups; pass them to any torch optimizer::

    optimizer = torch.optim.AdamW(loraplus.param_groups(model, lr=2e-4, ratio=16))
"""

from __future__ import annotations

import torch

from lorakit.core.layers import LoraLayer
from lorakit.errors import ConfigError


def param_groups(model: torch.nn.Module, lr: float, ratio: float = 16.0,
                 weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups: every LoRA B at ``lr·ratio``; everything else that trains (A, DoRA magnitudes,
    AdaLoRA's Λ, modules_to_save heads, biases) at ``lr``. Weight decay applies to matrices only
    (1-D tensors — biases, norms, magnitudes — get none). Shared tensors appear once.

    Differs from PEFT's ``create_loraplus_optimizer`` in two places: PEFT also gives every 1-D
    tensor the B rate, and puts LoRA on embeddings at a fixed 1e-6; here only B matrices are sped up.
    """
    if lr <= 0 or ratio <= 0 or weight_decay < 0:
        raise ConfigError(f"need lr > 0, ratio > 0, weight_decay ≥ 0; got lr={lr}, ratio={ratio}, "
                          f"weight_decay={weight_decay}")
    b_ids = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.adapters.values():
                b_ids.add(id(adapter.lora_b))
                if hasattr(adapter, "out_b"):  # MultiheadAttention's out_proj pair
                    b_ids.add(id(adapter.out_b))
    groups = {key: [] for key in ("a", "a_no_decay", "b", "b_no_decay")}
    seen = set()
    for param in model.parameters():  # deduplicated by torch
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        side = "b" if id(param) in b_ids else "a"
        groups[side if param.dim() >= 2 else f"{side}_no_decay"].append(param)
    out = [
        {"params": groups["a"], "lr": lr, "weight_decay": weight_decay},
        {"params": groups["a_no_decay"], "lr": lr, "weight_decay": 0.0},
        {"params": groups["b"], "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": groups["b_no_decay"], "lr": lr * ratio, "weight_decay": 0.0},
    ]
    return [g for g in out if g["params"]]
