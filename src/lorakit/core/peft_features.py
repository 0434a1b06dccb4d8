"""PEFT LoRA config keys lorakit does not implement, refused by name before anything loads.

Every key PEFT 0.21's ``LoraConfig`` writes falls in one of three groups:

* implemented exactly (the ``LoraConfig`` fields, including ``lora_bias``,
  ``trainable_token_indices``, ``target_parameters``, the ``olora``/``orthogonal`` inits);
* harmless bookkeeping, kept in ``LoraConfig.extra`` and written back unchanged
  (``auto_mapping``, ``peft_version``, ``megatron_core``, ``qalora_group_size``, and the
  ``eva_config``/``corda_config``/``loftq_config``/``lora_ga_config`` blocks when the init that
  would read them is not selected: PEFT ignores them too);
* features that change the numbers or the files: refused here with a ``ConfigError`` that names
  the feature and says what to do. A folder that uses one of them raises ``AdapterLoadError``
  (the model wraps this error), so nothing ever loads into different outputs.

The table is checked at config time (``LoraConfig(...)``, ``LoraConfig.from_dict``, the
``lora:`` section of a training config) and therefore also at load time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorakit.errors import ConfigError

_USE_PEFT = "load it with peft instead, or train a plain LoRA/DoRA adapter with lorakit"

# key -> (feature name, why lorakit refuses it). Refused when set to anything but its default.
UNSUPPORTED_KEYS: dict[str, tuple[str, str]] = {
    "kasa_config": ("KaSA", "its singular-value tensor (lora_diag) changes every output"),
    "velora_config": ("VeLoRA", "its tensors would be dropped when the adapter is saved again"),
    "monteclora_config": ("MonteCLoRA", "its sampling tensors would be dropped when the adapter is saved again"),
    "use_bdlora": ("BD-LoRA (block-diagonal LoRA)", "its block-diagonal factors have other shapes and math"),
    "use_qalora": ("QA-LoRA", "it pools the input by quantisation group before the A factor"),
    "alora_invocation_tokens": ("aLoRA (activated LoRA)", "it switches the adapter on only after the "
                                                         "invocation tokens"),
    "arrow_config": ("Arrow routing", "it routes tokens between several LoRA experts"),
    "layer_replication": ("layer replication", "it duplicates base-model layers"),
    "megatron_config": ("Megatron-LM parallel LoRA", "it shards the factors over Megatron's parallel layers"),
    "ensure_weight_tying": ("ensure_weight_tying", "it ties adapters of tied layers (e.g. embed_tokens and "
                                                   "lm_head) to each other"),
}

# init_lora_weights values PEFT accepts that lorakit refuses, with the feature name
UNSUPPORTED_INITS: dict[str, str] = {
    "loftq": "LoftQ initialisation (it re-quantises the base weights to fit the adapter)",
    "eva": "EVA initialisation (data-driven, needs activations from a data loader)",
    "corda": "CorDA initialisation (data-driven, rewrites the base weights)",
    "lora_ga": "LoRA-GA initialisation (gradient-driven, rewrites the base weights)",
    "mica": "MiCA (B frozen at the smallest singular directions of the base)",
}

_DEFAULTS: dict[str, Any] = {"use_qalora": False, "ensure_weight_tying": False}


def _is_default(key: str, value: Any) -> bool:
    if key in _DEFAULTS:
        return value == _DEFAULTS[key]
    return value is None or value is False or value == {} or value == [] or value == ""


def check_peft_features(data: Mapping[str, Any]) -> None:
    """Raise ConfigError for the first PEFT feature in `data` (config keys) that lorakit doesn't implement."""
    for key, (feature, why) in UNSUPPORTED_KEYS.items():
        if key in data and not _is_default(key, data[key]):
            raise ConfigError(
                f"{key}={data[key]!r} asks for {feature}, which lorakit does not implement ({why}); "
                f"{_USE_PEFT}, or remove {key}"
            )
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in UNSUPPORTED_INITS:
        raise ConfigError(
            f"init_lora_weights={init!r} asks for {UNSUPPORTED_INITS[init.lower()]}, which lorakit does not "
            f"implement; {_USE_PEFT}, or use init_lora_weights=True, 'gaussian', 'pissa', 'olora' or 'orthogonal'"
        )
