"""The model the engine runs: one base in memory, held by a :class:`LoraModel` from the start.

The LoraModel begins with no adapters (it then runs the base bit for bit); the registry loads and
unloads adapters into it (:mod:`lorakit.serve.loading`) and the engine calls :func:`forward`.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from lorakit.core.model import LoraModel


def load_base_model(base_dir: str | os.PathLike, dtype: str = "float32") -> nn.Module:
    """A causal LM from a transformers checkpoint folder, in eval mode (serve it as ``LoraModel(model)``)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(Path(base_dir), dtype=getattr(torch, dtype))
    return model.eval()


@functools.cache
def _forward_keywords(model_class: type) -> tuple[bool, str]:
    """(accepts logits_to_keep, the KV cache's keyword) of a model class's forward."""
    params = inspect.signature(model_class.forward).parameters
    # transformers ≥ 5.2x renamed past_key_values to cache (the old name warns until 5.40)
    return "logits_to_keep" in params, "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def forward(model: LoraModel, input_ids: torch.Tensor, adapter_names: Sequence[str | None], kv_cache=None,
            last_only: bool = False, **kwargs) -> torch.Tensor:
    """Logits (B, T or 1, V) with one adapter (or None = base) per row; `kv_cache` grows in place."""
    keep_logits, cache_kw = _forward_keywords(type(model.model))
    if last_only and keep_logits:  # prefill then computes one row of logits
        kwargs["logits_to_keep"] = 1
    if kv_cache is not None:
        kwargs[cache_kw] = kv_cache
        kwargs["use_cache"] = True
    return model(input_ids, adapter_names=list(adapter_names), **kwargs).logits
