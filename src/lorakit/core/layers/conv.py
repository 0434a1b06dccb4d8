"""LoRA on nn.Conv1d / Conv2d / Conv3d: A is a conv with the base's kernel, B a 1×1 conv.

h = conv(x, W) + scaling · conv₁ₓ₁(conv(x, A), B),  A: (r, in, *k), B: (out, r/g, 1, ...)

Because B is pointwise, the composition is one conv with weight einsum('or,r...->o...', B, A),
which is the merged delta.

A runs with the base's stride and padding only — dilation 1 and zero padding whatever the base
uses — because that is what PEFT's A conv does, and a PEFT adapter must give PEFT's
outputs. For a dilated conv or a non-zero ``padding_mode`` the LoRA path is then not the base conv
with a changed kernel, so merging such an adapter is refused (MergeError) rather than inexact.

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

from lorakit.core.layers.base import LoraAdapter, LoraLayer
from lorakit.errors import MergeError, TargetModuleError


class LoraConv(LoraLayer):
    kind = "conv"

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

    def add_adapter(self, name, rank, alpha, dropout=0.0, init=True, adapter_cls=LoraAdapter, rule="lora",
                    scale_rank=None):
        if adapter_cls.custom_math and self._unmergeable_reason():
            what = (f"a grouped convolution (groups={self.groups})" if self.groups > 1
                    else "a conv with dilation or a non-zero padding_mode")
            raise TargetModuleError(
                f"{adapter_cls.__name__} is not available on {what}: its weight-space math needs a mergeable "
                "delta, which this conv's LoRA path doesn't have. Use plain LoRA on this layer or exclude it"
            )
        return super().add_adapter(name, rank, alpha, dropout, init, adapter_cls, rule, scale_rank)

    def project_a(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        # PEFT's A: a conv with the base's kernel, stride and padding, but dilation 1, zero
        # padding and no groups, whatever the base uses: (N, in, *S) -> (N, r, *S')
        return self._functional(x, a, None, self.base.stride, self.base.padding)

    def project_b(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # pointwise, grouped like the base: (N, r, *S') -> (N, out, *S')
        return self._functional(u, b, groups=self.groups)

    def delta_from(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        reason = self._unmergeable_reason()
        if reason:
            raise MergeError(reason)
        return torch.einsum("or,r...->o...", b.flatten(1), a)  # (out, in, *k)

    def check_mergeable(self, names) -> None:
        reason = self._unmergeable_reason()
        if reason and names:
            raise MergeError(reason)

    def _unmergeable_reason(self) -> str | None:
        """Why this layer's LoRA path is no single conv with the base's settings, or None."""
        base, kind = self.base, type(self.base).__name__
        if self.groups > 1:
            return (f"a LoRA adapter on a grouped {kind} (groups={self.groups}) has no weight delta in the base "
                    "kernel's grouped layout, so it can't be merged or exported as a dense delta (PEFT refuses too). "
                    "Keep it unmerged (its forward is exact), or exclude grouped convs from target_modules")
        dilated = any(d != 1 for d in base.dilation)
        if dilated or base.padding_mode != "zeros":
            what = f"dilation={tuple(base.dilation)}" if dilated else f"padding_mode={base.padding_mode!r}"
            return (f"this {kind} has {what}, which PEFT's LoRA A (and so lorakit's, to stay exact with PEFT "
                    "files) doesn't use: the LoRA path is not the base conv with a changed kernel, so it can't be "
                    "merged or exported as a weight delta. Keep it unmerged, or exclude this layer")
        return None

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
                result[rows] = self.adapters[name].output(self, x[rows], result[rows]).to(result.dtype)
        return result
