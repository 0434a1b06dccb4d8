"""Exceptions lorakit raises on bad input. Each message says what was wrong and what to do."""


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


class TargetModuleError(LorakitError, ValueError):
    """target_modules / target_parameters matched nothing, or matched a layer type LoRA can't wrap."""


class AdapterError(LorakitError, KeyError):
    """An adapter name is unknown, already taken, or not a valid name."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class AdapterLoadError(LorakitError, ValueError):
    """An adapter folder is missing, corrupt, or doesn't fit the base model."""


class MergeError(LorakitError, ValueError):
    """An adapter can't be merged into its layer's base weight (e.g. LoRA on a grouped convolution)."""
