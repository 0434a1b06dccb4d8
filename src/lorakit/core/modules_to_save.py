"""Full trainable copies of chosen modules (PEFT's ``modules_to_save``), one per adapter.

Typical use: a classification head trained in full next to the LoRA layers. The original module
stays untouched for the base model and for adapters that don't save it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from lorakit.core.routing import Routed


class TrainableCopies(Routed, nn.Module):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.routing = None  # RowRouting during a mixed-adapter forward
        for p in self.original.parameters():
            p.requires_grad_(False)

    def add_adapter(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original)

    def delete_adapter(self, name: str) -> None:
        del self.copies[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def active_copy(self) -> nn.Module:
        for name in self.active_adapters:
            if name in self.copies:
                return self.copies[name]
        return self.original

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled:
            return self.original(x, *args, **kwargs)
        if self.routing is None:
            return self.active_copy()(x, *args, **kwargs)
        # one pass per adapter present in the batch, over that adapter's rows
        result = self.original(x, *args, **kwargs)
        names = [(g, n) for g, n in enumerate(self.routing.names) if n in self.copies]
        if not names:
            return result
        if not isinstance(result, torch.Tensor):  # e.g. an RNN's (output, h_n): which axis is the batch?
            raise NotImplementedError(
                f"a per-row adapter choice through the saved module {type(self.original).__name__} needs it to "
                f"return one tensor with batch rows first; it returns a {type(result).__name__}. Run one adapter "
                "per batch for this model"
            )
        result = result.clone()
        for g, name in names:
            rows = (self.routing.row_index == g).nonzero().squeeze(1).to(x.device)
            result[rows] = self.copies[name](x[rows], *args, **kwargs).to(result.dtype)
        return result
