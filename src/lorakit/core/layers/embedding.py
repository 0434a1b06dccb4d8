"""LoRA on nn.Embedding: the lookup goes through A's columns, then B.

h = E[ids] + scaling · (Aᵀ[ids])·Bᵀ,  A: (r, num_embeddings), B: (dim, r)

As in loralib and PEFT, A starts at zero and B ~ N(0, 1) (the reverse of Linear), and no dropout
is applied (dropping token ids has no meaning).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.core.layers.base import LoraAdapter, LoraLayer


class LoraEmbedding(LoraLayer):
    kind = "embedding"

    @property
    def in_features(self) -> int:
        return self.base.num_embeddings

    @property
    def out_features(self) -> int:
        return self.base.embedding_dim

    def add_adapter(self, name, rank, alpha, dropout=0.0, init=True, adapter_cls=LoraAdapter, rule="lora",
                    scale_rank=None):
        return super().add_adapter(name, rank, alpha, 0.0, init, adapter_cls, rule, scale_rank)

    @torch.no_grad()
    def reset_adapter(self, adapter: LoraAdapter, init: bool | str) -> None:
        if init is False:
            nn.init.normal_(adapter.lora_a)
        else:
            nn.init.zeros_(adapter.lora_a)
        nn.init.normal_(adapter.lora_b)

    def cast_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x

    def project_a(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        base = self.base
        # (N, T) ids -> (N, T, r); the base's padding/max-norm settings apply to the LoRA lookup too
        return F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def project_b(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return u @ b.T  # (..., r) -> (..., dim)

    def delta_from(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b @ a).T  # (num_embeddings, dim)
