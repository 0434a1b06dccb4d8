"""LoRA on nn.Conv1d / Conv2d / Conv3d: A is a conv with the base's kernel, B a 1×1 conv.

h = conv(x, W) + scaling · conv₁ₓ₁(conv(x, A), B),  A: (r, in, *k), B: (out, r, 1, ...)

Because B is pointwise, the composition is one conv with weight einsum('or,r...->o...', B, A),
which is the merged delta.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lorakit.errors import TargetModuleError
from lorakit.layers.base import LoraLayer


class LoraConv(LoraLayer):
    def __init__(self, base: nn.modules.conv._ConvNd):
        if base.groups != 1:
            raise TargetModuleError(
                f"LoRA on a grouped convolution (groups={base.groups}) is not supported; "
                "exclude this layer from target_modules"
            )
        if base.transposed:
            raise TargetModuleError("LoRA on transposed convolutions is not supported; exclude this layer")
        super().__init__(base)
        self._functional = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}[
            base.weight.dim() - 2
        ]

    @property
    def in_features(self) -> int:
        return self.base.in_channels

    @property
    def out_features(self) -> int:
        return self.base.out_channels

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kernel = tuple(self.base.kernel_size)
        return (rank, self.in_features, *kernel), (self.out_features, rank, *([1] * len(kernel)))

    def project_a(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        # the base's own stride/padding/dilation/padding_mode: (N, in, *S) -> (N, r, *S')
        return self.base._conv_forward(x, a, None)

    def project_b(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._functional(u, b)  # pointwise: (N, r, *S') -> (N, out, *S')

    def delta_from(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum("or,r...->o...", b.flatten(1), a)  # (out, in, *k)

    def rank_dim(self, x: torch.Tensor) -> int:
        return 1

    def broadcast_mask(self, mask: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        super().broadcast_mask(mask, u.movedim(1, -1))  # checks the row count
        return mask.view(*mask.shape, *([1] * (u.dim() - 2)))  # (N, K, 1, ...)
