"""Saving 4-bit models in the bitsandbytes / transformers checkpoint format.

A folder written by ``save_quantized`` is what ``transformers`` + bitsandbytes write for a
``load_in_4bit`` model: ``config.json`` with a ``quantization_config`` (quant_method
"bitsandbytes") and ``model.safetensors`` whose 4-bit layers carry ``weight`` plus the
``weight.absmax`` / ``weight.quant_map`` / ``weight.nested_*`` / ``weight.quant_state.*`` entries.
Either side loads the other's folders (``load_quantized`` here, ``from_pretrained`` there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lorakit.io.atomic import write_folder_atomically

from .linear4bit import Linear4bit
from .state import dtype_name

WEIGHTS_NAME = "model.safetensors"


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` transformers writes for this model's 4-bit layers."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("the model has no Linear4bit layers; call lorakit.quant.quantize_model first")
    kinds = {(m.quant_type, m.quant_state.nested) for m in layers}
    if len(kinds) != 1:
        raise ValueError(
            f"all 4-bit layers must share quant_type and double_quant to save, found {sorted(kinds)}"
        )
    ((quant_type, nested),) = kinds
    compute = {m.compute_dtype or m.quant_state.dtype for m in layers}
    kept = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m) is nn.Linear})
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": nested,
        "bnb_4bit_compute_dtype": dtype_name(compute.pop() if len(compute) == 1 else torch.float32),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": kept or None,
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def _dedup_tied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the second name of tensors that share storage (tied embeddings); safetensors refuses them."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out = {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and ident in seen:
            continue
        seen[ident] = key
        out[key] = tensor.detach().contiguous()
    return out


def save_quantized(model: nn.Module, save_directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``config.json`` (with its quantization_config) and ``model.safetensors`` atomically.

    The folder is built next to its destination, fsynced and renamed into place
    (:func:`lorakit.io.write_folder_atomically`), so a crash leaves the old folder or the new one.
    """
    from safetensors.torch import save_file

    target = Path(save_directory)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError("save_quantized needs a transformers model (one with a .config)")
    config_dict = config.to_dict()
    config_dict["quantization_config"] = quantization_config(model)
    tensors = _dedup_tied({k: v.to("cpu") for k, v in model.state_dict().items()})

    def fill(staging: Path) -> None:
        save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        with open(staging / "config.json", "w") as fh:
            json.dump(config_dict, fh, indent=2, sort_keys=True)
            fh.write("\n")
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(staging)

    # fsynced, then swapped in; an existing folder is replaced only once the new one is complete
    write_folder_atomically(target, fill)
    return target


def load_quantized(directory: str | os.PathLike, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a 4-bit folder written by ``save_quantized`` or by transformers + bitsandbytes.

    Streams it tensor by tensor (see ``load_4bit``); ``kwargs`` go to ``load_4bit``.
    """
    from .loading import load_4bit

    return load_4bit(directory, model_class=model_class, **kwargs)
