"""Exceptions lorakit raises on bad input. Each message says what was wrong and what to do."""

from __future__ import annotations

from collections.abc import Iterable


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


class ConfigKeyError(ConfigError, TypeError):
    """An unknown configuration key or keyword (usually a typo); the message names the closest valid one.

    Also a TypeError, which is what Python raises for an unexpected keyword argument, so code that
    caught that keeps working.
    """


def did_you_mean(name: str, choices: Iterable[str], aliases: dict[str, str] | None = None) -> str:
    """' (did you mean 'x'?)' for the closest of `choices` to a mistyped `name`, or '' when none is close.

    `aliases` maps names from other tools (e.g. transformers' ``learning_rate``) to ours.
    """
    import difflib

    choices = [str(c) for c in choices]
    alias = (aliases or {}).get(str(name))
    close = [alias] if alias in choices else difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
    if not close:  # a case slip (LR for lr) scores low in difflib's ratio
        close = [c for c in choices if c.lower() == str(name).lower()][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


class MergeError(LorakitError, ValueError):
    """A merge is refused: an adapter that can't be merged into its layer's base weight (e.g. LoRA on a grouped
    convolution), or `lorakit merge` inputs that are inconsistent (paths, weights, dtypes)."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (multi-line messages joined with '; ')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = "; ".join(lines) or type(exc).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."
