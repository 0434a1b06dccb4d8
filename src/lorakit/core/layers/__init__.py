"""LoRA layers: a wrapped base module plus named adapters (see base.py for the shared math)."""

from lorakit.core.layers.base import LoraAdapter, LoraLayer, RowRouting
from lorakit.core.layers.conv import LoraConv
from lorakit.core.layers.embedding import LoraEmbedding
from lorakit.core.layers.linear import LoraLinear, is_conv1d, is_linear_like
from lorakit.core.layers.mha import LoraMultiheadAttention
from lorakit.core.layers.param import LoraParameter

__all__ = [
    "LoraAdapter",
    "LoraConv",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraMultiheadAttention",
    "LoraParameter",
    "RowRouting",
    "is_conv1d",
    "is_linear_like",
    "wrap_module",
]


def wrap_module(module):
    """The LoRA layer class for `module`, or None when LoRA can't wrap it."""
    import torch.nn as nn

    if isinstance(module, LoraLayer):
        return None
    if is_linear_like(module):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoraConv(module)
    if isinstance(module, nn.MultiheadAttention):
        return LoraMultiheadAttention(module)
    return None
