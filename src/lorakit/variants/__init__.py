"""LoRA variants. Each is a LoraAdapter subclass in its own file; `adapter_class` picks one."""

from __future__ import annotations

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.layers import LoraAdapter, LoraLayer


def adapter_class(config: LoraConfig, layer: LoraLayer) -> type[LoraAdapter]:
    """The adapter class a config asks for on this layer."""
    if config.use_dora:
        raise ConfigError("use_dora=True: DoRA is not available in this version of lorakit")
    return LoraAdapter


def config_class_for_peft_type(peft_type: str) -> type[LoraConfig]:
    """The config class that reads an adapter_config.json with this peft_type."""
    raise ConfigError(f"peft_type {peft_type!r} is not supported; lorakit reads LORA adapters")
