"""`lorakit generate`: text from a causal LM with a trained adapter (greedy or sampled).

    lorakit generate --adapter runs/x/adapter "What is the capital of France?"
    lorakit generate --base path/to/llama --adapter a --temperature 0.7 --top-p 0.9 --seed 1 "Hi"

The prompt is laid out as the adapter's training data was (``training_meta.json``: the Alpaca
instruction template, the chat template, or the raw text), unless --format says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

FORMATS = {"instruction": "instruction", "chat": "chat", "prompt_completion": "raw", "text": "raw"}


@torch.no_grad()
def generate_text(model: Any, tokenizer: Any, prompt: str, fmt: str = "raw", max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, input_text: str = "") -> str:
    """The model's continuation of `prompt` (laid out as `fmt`), without the prompt.

    temperature 0 = greedy; otherwise sample from softmax(logits / temperature) restricted to the
    smallest set of tokens whose probability reaches top_p. `input_text` is the Alpaca "input" field.
    """
    from lorakit.train.data import eos_id, pad_id, prompt_ids

    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 1")
    ids = torch.tensor([prompt_ids(tokenizer, fmt if fmt != "raw" else "text", prompt, input_text)])  # (1, T)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    sampling = temperature > 0
    out = model.generate(
        input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), max_new_tokens=max_new_tokens,
        do_sample=sampling, temperature=temperature if sampling else None, top_p=top_p if sampling else None,
        top_k=None, eos_token_id=eos_id(tokenizer), pad_token_id=pad_id(tokenizer),
    )  # (1, T + new)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def quiet_transformers() -> None:
    """The CLI owns the terminal: no load reports or weight-loading bars from transformers."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text with a causal LM + LoRA adapter",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--adapter", required=True, help="adapter folder (a run's adapter/ or any PEFT-format folder)")
    p.add_argument("--base", help="base model: preset, checkpoint folder or Hugging Face id (default: from "
                   "training_meta.json)")
    p.add_argument("--format", choices=["auto", "instruction", "chat", "raw"], default="auto",
                   help="prompt layout; auto = as the adapter was trained")
    p.add_argument("--input", default="", help="instruction format: the optional input field")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base first (faster)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import LorakitError
    from lorakit.train.model_setup import load_trained

    quiet_transformers()
    try:
        model, tokenizer, meta = load_trained(args.adapter, args.base, merge=args.merge, device=args.device)
        if meta.get("task") == "classification":
            raise LorakitError("this adapter is a classifier; use lorakit predict")
        fmt = FORMATS.get(meta.get("format", ""), "raw") if args.format == "auto" else args.format
        for prompt in args.prompt:
            text = generate_text(model, tokenizer, prompt, fmt, args.max_new_tokens, args.temperature, args.top_p,
                                 args.seed, args.input)
            print(text if len(args.prompt) == 1 else f"{prompt}\t{text}")
    except (LorakitError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
