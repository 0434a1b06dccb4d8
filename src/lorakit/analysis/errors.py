"""Errors the analysis tools raise on bad input; each message names the file or layer at fault."""

from __future__ import annotations

from lorakit.errors import AdapterLoadError, LorakitError


class NotAnAdapterError(AdapterLoadError):
    """The path is not a PEFT-format LoRA adapter folder (or holds no LoRA layers)."""


class CorruptAdapterError(AdapterLoadError):
    """The adapter's files are unreadable, or its tensors don't fit together or its config."""


class UnsupportedAdapterError(AdapterLoadError):
    """A LoRA flavour whose ΔW is not scaling·B·A (DoRA, lora_bias, AdaLoRA, grouped conv)."""


class IncompatibleAdaptersError(LorakitError, ValueError):
    """Adapters that can't be compared or combined: different layers or shapes."""


class RankError(LorakitError, ValueError):
    """A requested rank the adapter can't provide (larger than it has, or below 1)."""


class CheckpointError(LorakitError, ValueError):
    """A base-model checkpoint folder (for ‖W0‖) that holds no safetensors weights."""


class PlanError(LorakitError, ValueError):
    """A memory plan that can't be built: unknown model/preset, bad sizes or dtype."""
