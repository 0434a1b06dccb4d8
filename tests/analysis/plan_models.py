"""A mid-size random Llama for the planner's measured checks, as a config folder.

It is the model ``lorakit plan --model tiny-llama`` used to plan before "tiny-llama" meant one
model everywhere (now the training preset, too small for memory checks: the framework's constant
overhead would swamp it). BENCHMARKS.md's planner table measures this config.
"""

from __future__ import annotations

import os
import tempfile

# ≈19.3M params, most in the 32k vocabulary; a step at 4 × 128 peaks at about 300 MiB
LLAMA_256: dict = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def llama_256_folder(folder: str | os.PathLike | None = None) -> str:
    """`folder` (default: a new temporary one) holding LLAMA_256's config.json, for PlanRequest.model."""
    from transformers import LlamaConfig

    folder = str(folder) if folder is not None else tempfile.mkdtemp(prefix="llama256-")
    LlamaConfig(**LLAMA_256, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return folder
