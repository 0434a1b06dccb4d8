"""The running batch's KV cache: left-padded rows in one transformers ``DynamicCache``.

Row i holds ``lengths[i]`` real positions, right-aligned: the first ``T - lengths[i]`` positions are
padding that the attention mask hides (``mask[i, :T - lengths[i]] == 0``) and RoPE never sees (each
row's ``position_ids`` count only its real tokens). A decode step appends one column for every
row. Rows join (their prefill's cache, one row or a left-padded batch, padded on the left to the
common length, or the batch padded to theirs) and leave (rows dropped, then columns that are padding in every remaining row
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

    def join(self, new_cache: DynamicCache, lengths: int | list[int]) -> None:
        """Append the rows of a prefill cache: `lengths[i]` real positions in row i, right-aligned.

        A batched prefill's cache is left-padded to its longest prompt (a batch-1 one is not padded);
        an int means one row.
        """
        _check_layers(new_cache)
        lengths = [lengths] if isinstance(lengths, int) else list(lengths)
        length = max(lengths)
        cols = new_cache.layers[0].keys.shape[2]
        if cols > length:  # rows were dropped after the prefill: columns that are padding everywhere go
            for layer in new_cache.layers:
                layer.keys = layer.keys[:, :, cols - length:, :]
                layer.values = layer.values[:, :, cols - length:, :]
        new_mask = (torch.arange(length)[None, :] >= length - torch.tensor(lengths)[:, None]).long()  # (k, length)
        if self.cache is None:
            self.cache, self.lengths, self.mask = new_cache, lengths, new_mask
            return
        width = self.width
        if length > width:
            self._pad_left(self.cache, length - width)
            self.mask = torch.nn.functional.pad(self.mask, (length - width, 0))
            width = length
        elif length < width:
            self._pad_left(new_cache, width - length)
            new_mask = torch.nn.functional.pad(new_mask, (width - length, 0))
        for layer, new in zip(self.cache.layers, new_cache.layers):
            layer.keys = torch.cat([layer.keys, new.keys], dim=0)  # (B+k, H, T, D)
            layer.values = torch.cat([layer.values, new.values], dim=0)
        self.mask = torch.cat([self.mask, new_mask], dim=0)
        self.lengths += lengths

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


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (k, W): the prompts right-aligned to the longest.

    The padding is token 0 at position 0, hidden by the mask; each row's positions count only its real
    tokens, so RoPE sees every prompt as it would alone.
    """
    lengths = torch.tensor([len(p) for p in prompts])
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] >= width - lengths[:, None]).long()
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    ids[mask.bool()] = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def _check_layers(cache: DynamicCache) -> None:
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            raise UnsupportedCacheError(
                f"the batched engine needs plain growing K/V cache layers, got {type(layer).__name__}; "
                "sliding-window / hybrid-cache models are not supported by `lorakit serve`"
            )
