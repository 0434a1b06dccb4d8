"""quantize_model: swap a model's nn.Linear layers for 4-bit Linear4bit layers, in place."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from .codes import QUANT_TYPES
from .linear4bit import Linear4bit, _check_compute_dtype
from .state import check_blocksize


def is_skipped(name: str, skip: Iterable[str]) -> bool:
    """True if a dotted module path ``name`` contains one of ``skip`` as whole components.

    ``"lm_head"`` skips ``lm_head``; ``"mlp"`` skips everything under any ``...mlp``;
    ``"layers.0.self_attn.q_proj"`` skips just that layer.
    """
    dotted = f".{name}."
    return any(f".{s.strip('.')}." in dotted for s in skip)


def output_embedding(model: nn.Module) -> nn.Module | None:
    get_out = getattr(model, "get_output_embeddings", None)
    return get_out() if callable(get_out) else None


def linear_targets(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> list[str]:
    """Names of the nn.Linear modules ``quantize_model`` would replace (the output head never)."""
    skip = list(skip)
    head = output_embedding(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and not is_skipped(name, skip)
    ]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    double_quant: bool = True,
    skip: Iterable[str] = ("lm_head",),
    compute_dtype: torch.dtype | None = None,
    blocksize: int = 64,
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` (except ``skip`` names and the output embedding)
    by a frozen ``Linear4bit`` holding ``quant(W)``; returns the same model object.

    Args:
        quant_type: "nf4" (QLoRA's NormalFloat) or "fp4".
        double_quant: also quantise the per-block scales to 8 bits (≈4.127 instead of 4.5 bits/param).
        skip: module names (whole dotted components) to keep in full precision.
        compute_dtype: dtype of the matmul (float32 / bfloat16); None = each weight's own dtype.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if isinstance(skip, str):
        skip = [skip]
    check_blocksize(blocksize)
    _check_compute_dtype(compute_dtype)
    names = linear_targets(model, skip)
    for name in names:
        linear = model.get_submodule(name)
        quantized = Linear4bit.from_linear(linear, blocksize, double_quant, compute_dtype, quant_type)
        quantized.train(linear.training)  # an eval-mode model stays in eval mode
        set_submodule(model, name, quantized)
        del linear
    return model
