"""The running batch's KV cache: left-padded rows in one transformers ``DynamicCache``.

Row i holds ``lengths[i]`` real positions, right-aligned: the first ``T - lengths[i]`` positions are
padding that the attention mask hides (``mask[i, :T - lengths[i]] == 0``) and RoPE never sees (each
row's ``position_ids`` count only its real tokens). A decode step appends one column for every
row. Rows join (their own prefill cache, padded on the left to the common length, or the batch
padded to theirs) and leave (rows dropped, then columns that are padding in every remaining row
trimmed), so the batch never holds more columns than its longest row.

Padding never changes a row's result beyond float rounding: masked positions get probability 0.
Exact equality with an unpadded run is not guaranteed bit for bit, because CPU GEMM/attention
kernels pick different blockings for different shapes; the serve tests check greedy tokens.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class UnsupportedCacheError(NotImplementedError):
    """The model's cache layers are not plain growing K/V tensors (e.g. sliding-window layers)."""


class BatchCache:
    """Batched K/V tensors with per-row lengths and the matching 2-D attention mask."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, T) long, 1 = real position
        self.lengths: list[int] = []  # real positions per row

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def join(self, row_cache: DynamicCache, length: int) -> None:
        """Append one row (a batch-1 prefill cache holding `length` positions)."""
        _check_layers(row_cache)
        if self.cache is None:
            self.cache, self.lengths = row_cache, [length]
            self.mask = torch.ones(1, length, dtype=torch.long)
            return
        width = self.width
        if length > width:
            self._pad_left(self.cache, length - width)
            self.mask = torch.nn.functional.pad(self.mask, (length - width, 0))
            width = length
        elif length < width:
            self._pad_left(row_cache, width - length)
        for layer, new in zip(self.cache.layers, row_cache.layers):
            layer.keys = torch.cat([layer.keys, new.keys], dim=0)  # (B+1, H, T, D)
            layer.values = torch.cat([layer.values, new.values], dim=0)
        row_mask = torch.zeros(1, width, dtype=torch.long)
        row_mask[:, width - length:] = 1
        self.mask = torch.cat([self.mask, row_mask], dim=0)
        self.lengths.append(length)

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_mask (B, T+1), position_ids (B, 1)) for a one-token decode step."""
        mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long)], dim=1)
        positions = torch.tensor(self.lengths, dtype=torch.long)[:, None]
        return mask, positions

    def advance(self, step_mask: torch.Tensor) -> None:
        """Record the decode step just run (the model appended one K/V column per row)."""
        self.mask = step_mask
        self.lengths = [n + 1 for n in self.lengths]

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then drop all-padding columns on the left."""
        if not rows:
            self.__init__()
            return
        index = torch.tensor(rows, dtype=torch.long)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.lengths = [self.lengths[i] for i in rows]
        drop = self.width - max(self.lengths)
        if drop > 0:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, drop:, :]
                layer.values = layer.values[:, :, drop:, :]
            self.mask = self.mask[:, drop:]

    @staticmethod
    def _pad_left(cache: DynamicCache, n: int) -> None:
        for layer in cache.layers:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, n, 0))  # (B, H, n + T, D)
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, n, 0))


def _check_layers(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            raise UnsupportedCacheError(
                f"the batched engine needs plain growing K/V cache layers, got {type(layer).__name__}; "
                "sliding-window / hybrid-cache models are not supported by `lorakit serve`"
            )
