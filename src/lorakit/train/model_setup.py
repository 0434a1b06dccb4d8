"""Base model -> (quantised) -> LoraModel ready to train; and the final adapter folder.

The final ``adapter/`` is a PEFT-format folder plus the tokenizer and ``training_meta.json``
(task, data format, labels, base), which is what ``lorakit generate`` / ``predict`` need to
rebuild the model and lay prompts out as training did.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from lorakit.core.model import LoraModel, get_lora_model
from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig
from lorakit.train.presets import load_base, save_base

log = logging.getLogger(__name__)
META_NAME = "training_meta.json"



def quantize_base(base: torch.nn.Module, quant: dict[str, Any] | None) -> torch.nn.Module:
    """QLoRA: the frozen Linear layers become 4-bit (lorakit.quantize_model); LoRA stays fp32."""
    if not quant or quant.get("method", "none") == "none":
        return base
    from lorakit.quant import quantize_model

    return quantize_model(base, quant["method"], double_quant=quant.get("double_quant", True),
                          skip=quant.get("skip", ())) or base


def build_model(cfg: TrainConfig, labels: list[str] | None, run_dir: Path | None,
                device: torch.device) -> LoraModel:
    """Load the base, optionally quantise it, inject the adapter, enable checkpointing.

    `run_dir` (the main process only) receives ``base/`` when the base is random (tiny-llama).
    """
    task = cfg.task
    num_labels = None
    if task == "classification":
        num_labels = cfg.model.num_labels or len(labels or [])
        if labels and num_labels < len(labels):
            raise ConfigError(f"model.num_labels={num_labels} is fewer than the {len(labels)} labels {labels}")
    try:
        # a base to be quantised is read, not mapped: see load_base (mmap)
        base = load_base(cfg.model.name_or_path, task, num_labels, cfg.model.torch_dtype, cfg.model.overrides,
                         cfg.train.seed, mmap=cfg.quant.method == "none")
    except Exception as exc:  # transformers' config validators raise several types
        if not cfg.model.overrides or isinstance(exc, ConfigError):
            raise
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.overrides {cfg.model.overrides}: the model can't be built with these values "
                          f"({message}); fix or remove them") from None
    check_max_length(cfg.data.max_length, base)
    if run_dir is not None and cfg.model.name_or_path == "tiny-llama":
        from lorakit.train.presets import byte_tokenizer

        save_base(base, byte_tokenizer(), run_dir / "base")
    base = quantize_base(base, cfg.quant.model_dump())
    if getattr(base, "config", None) is not None:
        base.config.use_cache = False  # the KV cache is useless (and costly) in training
    base.to(device)
    model = get_lora_model(base, cfg.lora_config())
    if cfg.train.gradient_checkpointing:
        kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(base, "gradient_checkpointing_enable"):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ConfigError("train.gradient_checkpointing needs a transformers model")
        # the embeddings are frozen, so their output needs grad for checkpointed blocks to backprop
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()
    return model


def check_max_length(max_length: int, base: torch.nn.Module) -> None:
    """data.max_length beyond the positions the model has: an error for learned position tables
    (the lookup would fail mid-run), a warning for rotary models (they run, untrained that far)."""
    limit = getattr(getattr(base, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int) or max_length <= limit:
        return
    learned = any(name.endswith(("position_embeddings", "wpe")) for name, _ in base.named_modules())
    message = (f"data.max_length={max_length} exceeds the model's {limit} positions "
               f"(config.max_position_embeddings); set data.max_length ≤ {limit}")
    if learned:
        raise ConfigError(message)
    warnings.warn(message + " — longer examples run on positions the model never saw", stacklevel=2)


def base_reference(cfg: TrainConfig, run_dir: Path) -> str:
    """How generate/predict find the base: the saved random base, or the configured name."""
    if cfg.model.name_or_path == "tiny-llama":
        return str((run_dir / "base").resolve())
    name = cfg.model.name_or_path
    return name if name == "minilm" or not Path(name).exists() else str(Path(name).resolve())


def write_final(model: LoraModel, tokenizer: Any, cfg: TrainConfig, data: Any, run_dir: Path) -> Path:
    folder = run_dir / "adapter"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))
    meta = {"task": cfg.task, "format": data.format, "labels": data.labels,
            "num_labels": (cfg.model.num_labels or len(data.labels)) if data.labels else None,
            "base": base_reference(cfg, run_dir), "max_length": cfg.data.max_length,
            "overrides": cfg.model.overrides, "torch_dtype": cfg.model.torch_dtype,
            "quant": cfg.quant.model_dump()}
    (folder / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def read_meta(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / META_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def load_trained(adapter_dir: str | Path, base: str | None = None, merge: bool = False,
                 device: str = "cpu") -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, meta) for inference from a trained adapter folder."""
    from transformers import AutoTokenizer

    from lorakit.train.presets import load_tokenizer

    meta = read_meta(adapter_dir)
    base = base or meta.get("base")
    if not base:
        raise ConfigError(f"{adapter_dir} has no {META_NAME}; pass --base (a preset or a checkpoint folder)")
    task = meta.get("task", "causal_lm")
    quant = meta.get("quant")
    model = load_base(base, task, meta.get("num_labels"), meta.get("torch_dtype", "float32"),
                      meta.get("overrides"), mmap=not quant or quant.get("method", "none") == "none")
    model = quantize_base(model, quant)  # the adapter was trained on this (4-bit) base
    lora = LoraModel.from_pretrained(model, adapter_dir)
    has_tokenizer = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir)) if has_tokenizer else load_tokenizer(base)
    if merge:
        model = lora.merge_and_unload()
    else:
        model = lora
    model.to(device).eval()
    return model, tokenizer, meta
