"""A live model's adapter tensors under PEFT's keys: save reads them, load copies into them.

The key grammar (prefix, suffixes per layer kind and variant) is :mod:`lorakit.core.adapter_weights`';
this module only knows how lorakit's module tree maps to PEFT's wrapped model, which names a
wrapper's inner module ``BASE_LAYER`` (lorakit: ``base``), so

* a wrapped layer's bias (``bias="lora_only"``/``"all"``) sits under the ``BASE_LAYER`` hop;
* raw-parameter LoRA (``target_parameters``) nests one wrapper per parameter, the first one
  registered innermost, so the inner ones' keys carry one ``BASE_LAYER`` hop per outer wrapper;
* trainable tokens and modules_to_save copies use PEFT's wrapper names (``TOKENS_SUFFIX``,
  ``MODULES_TO_SAVE``, ``ORIGINAL_MODULE``).

Each LoRA layer exports its adapter as a :class:`~lorakit.core.adapter_weights.TargetWeights`
(``LoraLayer.export_adapter``) holding the live tensors; :func:`export_adapter_weights` gathers
them into one :class:`~lorakit.core.adapter_weights.AdapterWeights`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lorakit.core.adapter_weights import (
    BASE_BIAS,
    BASE_LAYER,
    MODULES_TO_SAVE,
    ORIGINAL_MODULE,
    PREFIX,
    TOKENS_BASE,
    TOKENS_SUFFIX,
    AdapterWeights,
    join_key,
    normalise_key,
    parse_peft_key,
)
from lorakit.core.layers import LoraLayer
from lorakit.core.layers.param import LoraParameter
from lorakit.core.modules_to_save import TrainableCopies
from lorakit.core.targeting import named_wrappers
from lorakit.core.trainable_tokens import TrainableTokens
from lorakit.errors import AdapterLoadError


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


def peft_path(path: str, model: nn.Module) -> str:
    """A lorakit module (or parameter) path spelled as in PEFT's wrapped model."""
    parts = path.split(".") if path else []
    out: list[str] = []
    module: nn.Module | None = model
    for part in parts:
        child = getattr(module, part, None) if module is not None else None
        if isinstance(module, LoraLayer) and part == "base":
            out.append(BASE_LAYER)
        elif isinstance(module, TrainableTokens) and part == "base":
            out.append(TOKENS_BASE)
        elif isinstance(module, TrainableCopies) and part == "original":
            out.append(ORIGINAL_MODULE)
        elif isinstance(module, TrainableCopies) and part == "copies":
            out.append(MODULES_TO_SAVE)  # PEFT drops the adapter name (the next part) from saved keys
        elif isinstance(module, nn.ModuleDict) and out and out[-1] == MODULES_TO_SAVE:
            pass
        else:
            out.append(part)
        module = child if isinstance(child, nn.Module) else None
    return ".".join(out)


def export_adapter_weights(model: nn.Module, name: str, bias: str = "none") -> AdapterWeights:
    """Adapter `name` of a live model as an AdapterWeights holding the live tensors (no copies).

    Its targets are the LoRA layers; ``other`` holds the modules_to_save copies, trainable tokens and,
    with `bias`, the base biases PEFT saves with the adapter.
    """
    weights = AdapterWeights(targets={})
    for path, module in named_wrappers(model):
        if isinstance(module, LoraLayer) and name in module.adapters:
            stem = peft_path(path, model)
            weights.targets[stem] = module.export_adapter(name, stem)
            if bias == "lora_only" and isinstance(module.base._parameters.get("bias"), torch.Tensor):
                weights.other[join_key(stem, BASE_BIAS)] = module.base.bias
        elif isinstance(module, TrainableCopies) and name in module.copies:
            stem = original_path(path, model)
            for key, tensor in module.copies[name].state_dict(keep_vars=True).items():
                weights.other[join_key(stem, key)] = tensor
        elif isinstance(module, TrainableTokens) and module.tied_to is None and name in module.values:
            weights.other[join_key(peft_path(path, model), TOKENS_SUFFIX)] = module.values[name]
    if bias == "all":  # PEFT's rule: every parameter named `bias` (not bias_ih_l0 & co), the frozen
        # originals of modules_to_save included, and this adapter's trained copies a second time
        known = set(weights.peft_state_dict())
        for key, param in model.named_parameters():
            if not (key == "bias" or key.endswith(".bias")) or ".adapters." in key:
                continue
            if ".copies." in key and f".copies.{name}." not in key:
                continue
            if PREFIX + peft_path(key, model) not in known:
                weights.other.setdefault(PREFIX + peft_path(key, model), param)
    return weights


def adapter_tensor_refs(model: nn.Module, name: str, bias: str = "none") -> dict[str, torch.Tensor]:
    """PEFT key -> the live tensor, for every tensor that belongs to adapter `name`."""
    return export_adapter_weights(model, name, bias).peft_state_dict()


def legacy_keys(model: nn.Module, name: str) -> dict[str, str]:
    """Keys lorakit < 0.2 wrote for raw-parameter LoRA (under ``rnn.weight_ih_l0``, the parameter's own
    path, instead of PEFT's nested wrappers) -> today's key."""
    out: dict[str, str] = {}
    for path, module in named_wrappers(model):
        if isinstance(module, LoraParameter) and name in module.adapters:
            old = module.export_adapter(name, f"{original_path(path, model)}.{module.param_name}")
            new = module.export_adapter(name, peft_path(path, model))
            out.update(zip(old.peft_tensors(), new.peft_tensors()))
    return out


def get_adapter_state_dict(model: nn.Module, name: str, bias: str = "none") -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in adapter_tensor_refs(model, name, bias).items()}


def _drop_unchanged_base_tensors(model: nn.Module, given: dict[str, torch.Tensor], keys: list[str]) -> list[str]:
    """Base-model tensors a PEFT file may carry (``save_embedding_layers``): fine when equal to the model's.

    A different value would overwrite the base model in PEFT; lorakit refuses that rather than
    load the adapter into other outputs.
    """
    if not keys:
        return keys
    base = {PREFIX + peft_path(name, model): t for name, t in
            [*model.named_parameters(), *model.named_buffers()] if ".adapters." not in name}
    left = []
    for key in keys:
        ref = base.get(key)
        if ref is None:
            left.append(key)
            continue
        value = given[key]
        if tuple(ref.shape) != tuple(value.shape) or not torch.equal(ref.detach(), value.to(ref.device, ref.dtype)):
            raise AdapterLoadError(
                f"the adapter file carries the base-model tensor {key!r} with values that differ from this model's "
                "(PEFT's save_embedding_layers, e.g. after resizing the vocabulary); lorakit never overwrites "
                "base weights from an adapter: load the matching base model (with that embedding) first"
            )
    return left


def _is_base_bias(key: str) -> bool:
    """A base model's bias saved with the adapter (bias="all"/"lora_only"), not an adapter tensor."""
    return key.endswith(".bias") and parse_peft_key(key) is None


def _match_base_bias_names(given: dict[str, torch.Tensor], refs: dict[str, torch.Tensor]) -> None:
    """Rename the file's base-bias keys to this model's: a bias is ``X.<BASE_BIAS>`` while some
    adapter wraps X and ``X.bias`` otherwise, so a ``bias="all"`` file saved alone names ``X.bias``
    where a model that already holds another adapter on X has ``X.<BASE_BIAS>`` (and back)."""
    tail = "." + BASE_BIAS
    for key in [k for k in given if k not in refs and _is_base_bias(k)]:
        other = key[: -len(tail)] + ".bias" if key.endswith(tail) else key[: -len(".bias")] + tail
        if other in refs and other not in given:
            given[other] = given.pop(key)


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, name: str, tensors: dict[str, torch.Tensor],
                            bias: str = "none") -> None:
    """Copy `tensors` into adapter `name`; every check happens before the first copy."""
    # both sides normalised: a wrapper may name its tensors the way PEFT writes them (BASE_LAYER hops)
    refs = {normalise_key(k): v for k, v in adapter_tensor_refs(model, name, bias).items()}
    given = {normalise_key(k): v for k, v in tensors.items()}
    for old, new in legacy_keys(model, name).items():
        if old in given and new not in given:
            given[new] = given.pop(old)
    if bias != "none":
        _match_base_bias_names(given, refs)
    optional = set()
    if bias != "none":  # a bias the file doesn't carry keeps the base model's value (PEFT's behaviour)
        optional = {k for k in refs if _is_base_bias(k)}
    missing = [k for k in refs if k not in given and k not in optional]
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
    unexpected = _drop_unchanged_base_tensors(model, given, sorted(set(given) - set(refs)))
    if unexpected:
        raise AdapterLoadError(
            f"the adapter file has {len(unexpected)} tensor(s) this model has no place for, e.g. {unexpected[:3]}: "
            "loading without them would change the outputs. The folder was written for another base model, "
            "or with a PEFT feature lorakit does not implement (see docs/DESIGN.md, 'PEFT features')"
        )
    for key, ref in refs.items():
        if key in given:
            ref.copy_(given[key].to(dtype=ref.dtype, device=ref.device))
