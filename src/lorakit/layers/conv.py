"""LoRA on nn.Conv1d / Conv2d / Conv3d: A is a conv with the base's kernel, B a 1×1 conv.

h = conv(x, W) + scaling · conv₁ₓ₁(conv(x, A), B),  A: (r, in, *k), B: (out, r/g, 1, ...)

Because B is pointwise, the composition is one conv with weight einsum('or,r...->o...', B, A),
which is the merged delta.

Grouped convolutions (``groups = g > 1``) follow PEFT's layout: A stays a full (ungrouped) conv
over all input channels and B is a grouped 1×1 conv (each group of out/g output channels reads
its own r/g rank channels), so r must be divisible by g. The LoRA path then mixes channels across
groups, which a grouped base kernel can't express: such an adapter can't be merged, and lorakit
says so instead of merging something different (PEFT raises too).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.errors import MergeError, TargetModuleError
from lorakit.layers.base import LoraAdapter, LoraLayer


class LoraConv(LoraLayer):
    def __init__(self, base: nn.modules.conv._ConvNd):
        if base.transposed:
            raise TargetModuleError("LoRA on transposed convolutions is not supported; exclude this layer")
        super().__init__(base)
        self._functional = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[base.weight.dim() - 2]

    @property
    def groups(self) -> int:
        return self.base.groups

    @property
    def in_features(self) -> int:
        return self.base.in_channels

    @property
    def out_features(self) -> int:
        return self.base.out_channels

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if rank % self.groups:
            raise TargetModuleError(
                f"LoRA rank {rank} on a {type(self.base).__name__} with groups={self.groups}: the rank must be "
                f"divisible by groups (B is a grouped 1×1 conv, as in PEFT). Pick r as a multiple of {self.groups} "
                "(rank_pattern can set it for this layer alone) or exclude this layer"
            )
        kernel = tuple(self.base.kernel_size)
        ones = [1] * len(kernel)
        return (rank, self.in_features, *kernel), (self.out_features, rank // self.groups, *ones)

    def add_adapter(self, name, rank, alpha, scaling, dropout, init=True, adapter_cls=LoraAdapter):
        if self.groups > 1 and adapter_cls.custom_math:
            raise TargetModuleError(
                f"{adapter_cls.__name__} is not available on a grouped convolution (groups={self.groups}): its "
                "weight-space math needs a mergeable delta, which a grouped conv doesn't have. Use plain LoRA on "
                "this layer or exclude it"
            )
        return super().add_adapter(name, rank, alpha, scaling, dropout, init, adapter_cls)

    def project_a(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        # the base's own stride/padding/dilation/padding_mode, never its groups: (N, in, *S) -> (N, r, *S')
        if self.groups == 1:
            return self.base._conv_forward(x, a, None)
        base = self.base
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            return self._functional(x, a, None, base.stride, 0, base.dilation)
        return self._functional(x, a, None, base.stride, base.padding, base.dilation)

    def project_b(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # pointwise, grouped like the base: (N, r, *S') -> (N, out, *S')
        return self._functional(u, b, groups=self.groups)

    def delta_from(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.groups > 1:
            raise MergeError(self._grouped_message())
        return torch.einsum("or,r...->o...", b.flatten(1), a)  # (out, in, *k)

    def check_mergeable(self, names) -> None:
        if self.groups > 1 and names:
            raise MergeError(self._grouped_message())

    def _grouped_message(self) -> str:
        return (f"a LoRA adapter on a grouped {type(self.base).__name__} (groups={self.groups}) has no weight delta in "
                "the base kernel's grouped layout, so it can't be merged or exported as a dense delta (PEFT refuses "
                "too). Keep it unmerged (its forward is exact), or exclude grouped convs from target_modules")

    def rank_dim(self, x: torch.Tensor) -> int:
        return 1

    def broadcast_mask(self, mask: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        super().broadcast_mask(mask, u.movedim(1, -1))  # checks the row count
        return mask.view(*mask.shape, *([1] * (u.dim() - 2)))  # (N, K, 1, ...)

    def mixed_forward(self, x, result, routing):
        if self.groups == 1:
            return super().mixed_forward(x, result, routing)
        # B's groups split the rank axis, so factors of several adapters can't be concatenated
        # along it: one pass per adapter (never per row) over that adapter's rows
        result = result.clone()
        for g, name in enumerate(routing.names):
            if name in self.adapters:
                rows = (routing.row_index == g).nonzero().squeeze(1).to(x.device)
                result[rows] = self.adapters[name].output(self, x[rows], result[rows])
        return result
