"""The adapters of a merge, loaded onto a base model: shared by the in-memory and the streaming merge."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch.nn as nn

from lorakit.core.model import LoraModel


def attach_adapters(model: nn.Module, adapter_dirs: Sequence[str | Path], weights: Sequence[float] | None,
                    lora_class: type[LoraModel] = LoraModel) -> tuple[LoraModel, list[str]]:
    """Load every adapter folder onto `model`; (the LoraModel, the adapter names a merge folds in, all active).

    Args:
        model: the base model (the streaming merge passes a meta-device skeleton and its own `lora_class`).
        adapter_dirs: PEFT-format folders, named ``adapter0``, ``adapter1``, ... in that order.
        weights: one weight per adapter; unless all are 1 they become one exact weighted adapter
            (``add_weighted_adapter(..., "cat")``) named ``merged``.
        lora_class: LoraModel or a subclass.
    """
    names = [f"adapter{i}" for i in range(len(adapter_dirs))]
    lora = lora_class.from_pretrained(model, adapter_dirs[0], adapter_name=names[0])
    for name, folder in zip(names[1:], adapter_dirs[1:]):
        lora.load_adapter(folder, adapter_name=name)
    if weights is not None and any(w != 1.0 for w in weights):
        lora.add_weighted_adapter(names, weights, "merged", combination_type="cat")
        names = ["merged"]
    return lora, names
