"""Full validation of an adapter folder's contents before anything touches the model.

``adapter_config.json`` is user input: a mistyped field must be refused with an error that names
the key, never escape as a ``TypeError`` from deep inside the injection code, and a config that
would allocate absurd amounts of memory (``r: 1000000000``) must be refused before the
allocation. The tensors are checked too: floating point only (an int/bool/complex tensor is a
broken file, not something to cast silently) and finite (a NaN in a factor poisons every output).

Used by every load path: :meth:`LoraModel.from_pretrained` / ``load_adapter`` (so also
``lorakit merge``, ``lorakit serve`` and the admin endpoint).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lorakit.errors import AdapterLoadError

MAX_RANK = 1 << 16  # no real adapter comes near this; r: 10**9 would try to allocate terabytes
MAX_ALPHA = 1e6  # scaling beyond this overflows fp32 deltas: a broken or hostile file
MAX_DEPTH = 16  # nesting of JSON values; PEFT configs are at most 3 deep
MAX_ITEMS = 100_000  # list / dict entries per value (target_modules, rank_pattern, ...)
# adapter elements allowed per base element (plus a floor for tiny models): a real adapter is < 1x
MAX_ADAPTER_TO_BASE = 4.0
MIN_ADAPTER_BUDGET = 1 << 24
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_BOOL_KEYS = ("fan_in_fan_out", "use_rslora", "use_dora", "use_dylora", "inference_mode")
_OPTIONAL_STR_KEYS = ("task_type", "base_model_name_or_path", "revision", "shared_a_with")
_ADALORA_INT_KEYS = ("init_r", "target_r", "tinit", "tfinal", "deltaT")
_ADALORA_FLOAT_KEYS = ("beta1", "beta2", "orth_reg_weight")


def validate_adapter_config(data: Any, source: str = "adapter_config.json", error: type[Exception] = AdapterLoadError,
                            hint: str = "fix the file or re-save the adapter") -> None:
    """Raise `error` naming `source` and the key if `data` is not a sane adapter config."""

    def fail(key: str, what: str, value: Any = ...) -> None:
        shown = "" if value is ... else f", got {_short(value)}"
        raise error(f"{source}: {key} must be {what}{shown}; {hint}")

    if not isinstance(data, Mapping):
        raise error(f"{source} must hold a JSON object, got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(key, str):
            fail("every key", "a string", key)
        depth = _depth(value)
        if depth > MAX_DEPTH:
            fail(key, f"at most {MAX_DEPTH} levels deep", f"{depth} levels")
    peft_type = data.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        fail("peft_type", "a string such as 'LORA'", peft_type)
    adalora = peft_type.upper() == "ADALORA"

    if not adalora:
        _rank(data.get("r", 8), "r", fail)
    alpha = data.get("lora_alpha", 8)
    _positive_finite(alpha, "lora_alpha", fail)
    dropout = data.get("lora_dropout", 0.0)
    if not _is_number(dropout) or not 0 <= dropout < 1:
        fail("lora_dropout", "a number in [0, 1)", dropout)
    for key in ("target_modules", "exclude_modules", "layers_pattern"):
        _str_or_str_list(data.get(key), key, fail)
    for key in ("target_parameters", "modules_to_save"):
        value = data.get(key)
        if value is not None and not _is_str_list(value):
            fail(key, "null or a list of strings", value)
    layers = data.get("layers_to_transform")
    if layers is not None:
        items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 20
                                                   for i in items):
            fail("layers_to_transform", "null, a layer index or a list of layer indices (integers ≥ 0)", layers)
    bias = data.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        fail("bias", "one of 'none', 'all', 'lora_only'", bias)
    init = data.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        fail("init_lora_weights", "true, false or an init name such as 'gaussian' or 'pissa'", init)
    for key in _BOOL_KEYS:
        if key in data and data[key] is not None and not isinstance(data[key], bool):
            fail(key, "true or false", data[key])
    for key in _OPTIONAL_STR_KEYS:
        if data.get(key) is not None and not isinstance(data[key], str):
            fail(key, "null or a string", data[key])
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = data.get(key, {})
        if pattern is None and key == "rank_pattern" and adalora:
            continue  # PEFT writes null for an AdaLoRA adapter that was never pruned
        if not isinstance(pattern, Mapping) or len(pattern) > MAX_ITEMS:
            fail(key, "an object mapping module-name patterns to values (or {})", pattern)
        for name, value in pattern.items():
            if key == "alpha_pattern":
                _positive_finite(value, f"alpha_pattern[{name!r}]", fail)
            elif adalora:
                if not (isinstance(value, list) and all(isinstance(v, bool) for v in value)):
                    fail(f"rank_pattern[{name!r}]", "a list of booleans (AdaLoRA's rank mask)", value)
            else:
                _rank(value, f"rank_pattern[{name!r}]", fail)
    if adalora:
        for key in _ADALORA_INT_KEYS:
            if key in data:
                value = data[key]
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RANK * 1000:
                    fail(key, "a non-negative integer", value)
        _rank(data.get("init_r", 12), "init_r", fail)
        for key in _ADALORA_FLOAT_KEYS:
            if key in data and not (_is_number(data[key]) and math.isfinite(data[key])):
                fail(key, "a finite number", data[key])
        total = data.get("total_step")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
            fail("total_step", "null or a non-negative integer", total)


def check_config_fields(config: Any) -> None:
    """The same checks on a LoraConfig's fields (ConfigError), so a mistyped value in Python or a
    training YAML is refused by name instead of failing later inside the injection code."""
    import dataclasses

    from lorakit.errors import ConfigError

    data = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "extra"}
    for key in ("target_modules", "exclude_modules", "layers_pattern", "target_parameters", "modules_to_save"):
        if isinstance(data.get(key), (set, tuple)):
            data[key] = list(data[key])
    if isinstance(data.get("layers_to_transform"), tuple):
        data["layers_to_transform"] = list(data["layers_to_transform"])
    validate_adapter_config(data, "LoRA config", error=ConfigError, hint="fix that value")


def validate_adapter_tensors(tensors: Mapping[str, Any], source: str = "adapter_model.safetensors") -> None:
    """Every tensor floating point and finite (checked before any is copied into the model)."""
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise AdapterLoadError(f"{source}: {key!r} is not a tensor")
        if tensor.dtype not in FLOAT_DTYPES:
            raise AdapterLoadError(
                f"{source}: tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; adapter weights "
                "must be float16/bfloat16/float32/float64 (an integer, bool or complex tensor means a broken file)")
        if tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise AdapterLoadError(f"{source}: tensor {key!r} has NaN/inf values; the adapter is broken "
                                   "(training diverged?) and would poison every output")


def check_adapter_size(base_numel: int, shapes: Iterable[tuple[str, int, int, int]]) -> None:
    """Refuse an adapter whose factors would dwarf the base: Σ r·(in + out) elements ≤ a bound.

    `base_numel` is the base model's size (parameters and buffers, no adapters); `shapes` gives
    (module path, rank, in_features, out_features) per target.
    """
    base = base_numel
    budget = max(MAX_ADAPTER_TO_BASE * base, MIN_ADAPTER_BUDGET)
    total = 0
    for path, rank, fan_in, fan_out in shapes:
        total += rank * (fan_in + fan_out)
        if total > budget:
            raise AdapterLoadError(
                f"the adapter would need more than {budget:,.0f} elements ({MAX_ADAPTER_TO_BASE:g}x the base model; "
                f"rank {rank} on {path!r} alone is {rank * (fan_in + fan_out):,}); the rank (r / rank_pattern) is "
                "far too large for this model")


# ---------------------------------------------------------------------------------------------- helpers
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_finite(value: Any, key: str, fail) -> None:
    if not _is_number(value) or not math.isfinite(value) or not 0 < value <= MAX_ALPHA:
        fail(key, f"a finite number in (0, {MAX_ALPHA:g}]", value)


def _rank(value: Any, key: str, fail) -> None:
    if isinstance(value, float) and value.is_integer() and 0 < value <= MAX_RANK:
        return  # PEFT writes some ranks as 8.0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_RANK:
        fail(key, f"an integer rank in [1, {MAX_RANK}]", value)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= MAX_ITEMS and all(isinstance(v, str) for v in value)


def _str_or_str_list(value: Any, key: str, fail) -> None:
    if value is not None and not isinstance(value, str) and not _is_str_list(value):
        fail(key, "null, a string (regex or 'all-linear') or a list of strings", value)


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, iteratively (a 100k-deep value must not blow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
