"""Map one adapter's tensors to and from PEFT's key names.

PEFT key = ``base_model.model.`` + module path in the base model + a suffix that depends on the
layer kind (``lora_A.weight`` for Linear/Conv, ``lora_embedding_A`` for Embedding, variants add
their own such as ``lora_magnitude_vector``). The adapter name is never part of the key.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from lorakit.errors import AdapterLoadError
from lorakit.layers import LoraLayer
from lorakit.layers.param import LoraParameter
from lorakit.modules_to_save import TrainableCopies
from lorakit.targeting import named_wrappers

PREFIX = "base_model.model."


def original_path(path: str, model: nn.Module) -> str:
    """Drop the ``.base`` hops that nested parameter wrappers add to a module path."""
    parts = path.split(".") if path else []
    out: list[str] = []
    module = model
    for part in parts:
        child = getattr(module, part)
        if not (part == "base" and isinstance(module, LoraParameter)):
            out.append(part)
        module = child
    return ".".join(out)


def adapter_tensor_refs(model: nn.Module, name: str, bias: str = "none") -> dict[str, torch.Tensor]:
    """PEFT key -> the live parameter, for every tensor that belongs to adapter `name`."""
    refs: dict[str, torch.Tensor] = {}
    for path, module in named_wrappers(model):
        if isinstance(module, LoraLayer) and name in module.adapters:
            adapter = module.adapters[name]
            stem = original_path(path, model)
            if isinstance(module, LoraParameter):
                stem = f"{stem}.{module.param_name}"
            for attr, suffix in adapter.peft_keys(module).items():
                refs[f"{PREFIX}{stem}.{suffix}"] = getattr(adapter, attr)
            if bias == "lora_only" and getattr(module.base, "bias", None) is not None:
                refs[f"{PREFIX}{stem}.bias"] = module.base.bias
        elif isinstance(module, TrainableCopies) and name in module.copies:
            stem = original_path(path, model)
            for key, tensor in module.copies[name].state_dict(keep_vars=True).items():
                refs[f"{PREFIX}{stem}.{key}"] = tensor
    if bias == "all":
        for key, param in model.named_parameters():
            if key.endswith("bias") and ".copies." not in key and ".adapters." not in key:
                refs.setdefault(PREFIX + _strip_wrappers(key), param)
    return refs


def _strip_wrappers(key: str) -> str:
    return key.replace(".base.", ".").replace(".original.", ".")


def get_adapter_state_dict(model: nn.Module, name: str, bias: str = "none") -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in adapter_tensor_refs(model, name, bias).items()}


def _normalise_key(key: str) -> str:
    """Accept PEFT's spellings that differ from ours: `.base_layer.` hops, a missing prefix."""
    if not key.startswith(PREFIX):
        key = PREFIX + key
    return key.replace(".base_layer.", ".")


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, name: str, tensors: dict[str, torch.Tensor],
                            bias: str = "none") -> None:
    """Copy `tensors` into adapter `name`; every check happens before the first copy."""
    # both sides normalised: a wrapper may name its tensors the way PEFT writes them (``.base_layer.``)
    refs = {_normalise_key(k): v for k, v in adapter_tensor_refs(model, name, bias).items()}
    given = {_normalise_key(k): v for k, v in tensors.items()}
    missing = [k for k in refs if k not in given and not (k.endswith(".bias") and bias != "none")]
    if missing:
        raise AdapterLoadError(
            f"the adapter file lacks {len(missing)} tensor(s) this model needs, e.g. {missing[:3]}; "
            "it was probably trained for a different base model or with different target_modules"
        )
    for key, ref in refs.items():
        if key in given and tuple(given[key].shape) != tuple(ref.shape):
            raise AdapterLoadError(
                f"tensor {key!r} has shape {tuple(given[key].shape)} in the adapter file but "
                f"{tuple(ref.shape)} in this model; the adapter does not fit this base model"
            )
    unexpected = sorted(set(given) - set(refs))
    if unexpected:
        warnings.warn(
            f"ignoring {len(unexpected)} tensor(s) of the adapter file that this model has no place for, "
            f"e.g. {unexpected[:3]}",
            stacklevel=3,
        )
    for key, ref in refs.items():
        if key in given:
            ref.copy_(given[key].to(dtype=ref.dtype, device=ref.device))
