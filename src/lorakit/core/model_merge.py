"""LoraModel's merge half: fold adapters into the base weights, take them out again, unload.

A mixin of :class:`~lorakit.core.model.LoraModel`; it uses the model's ``model``, ``peft_config``,
``lora_layers()``, ``_wrappers()`` and ``_replace()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from lorakit.core.layers import LoraLayer
from lorakit.core.modules_to_save import TrainableCopies
from lorakit.core.targeting import named_wrappers
from lorakit.core.trainable_tokens import TrainableTokens


class MergeMixin:
    """merge_adapter / unmerge_adapter / merge_and_unload / unload for LoraModel."""

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = True) -> None:
        """W += ΔW in every layer for these adapters (fp32 arithmetic, cast back). Idempotent.

        Args:
            adapter_names: the adapters to merge (default: the active ones).
            safe_merge: check every delta is finite before changing a weight.

        A layer that can't merge (e.g. a grouped conv) raises MergeError before any layer changes.
        """
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        layers = list(self.lora_layers())
        for layer in layers:  # every layer first, so a refusal leaves no layer half merged
            layer.check_mergeable([n for n in names if n in layer.adapters and n not in layer.merged_adapters])
        for layer in layers:
            layer.merge(names, safe=safe_merge)
        for module in self._wrappers():
            if isinstance(module, TrainableTokens):
                module.merge(names)

    def unmerge_adapter(self) -> None:
        """Subtract every merged delta again, newest first, restoring the base weights."""
        for layer in self.lora_layers():
            layer.unmerge()
        for module in self._wrappers():
            if isinstance(module, TrainableTokens):
                module.unmerge()

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = True) -> nn.Module:
        """Merge, then return the plain base model (its own class, no LoRA modules left).

        Args:
            adapter_names: the adapters to merge (default: the active ones).
            safe_merge: as in :meth:`merge_adapter`.
        """
        self.merge_adapter(adapter_names, safe_merge)
        return self.unload(_merged=True)

    def unload(self, _merged: bool = False) -> nn.Module:
        """Remove every LoRA module and return the base model (merged weights stay merged).

        Args:
            _merged: internal (merge_and_unload): keep the active modules_to_save copies.
        """
        for path, module in sorted(named_wrappers(self.model), key=lambda kv: -kv[0].count(".")):
            if isinstance(module, (LoraLayer, TrainableTokens)):
                self._replace(path, module.base)
            elif isinstance(module, TrainableCopies):
                self._replace(path, module.active_copy() if _merged else module.original)
        self.peft_config.clear()
        self._served.clear()
        self._slots.clear()
        return self.model
