"""LoRA on nn.MultiheadAttention, with PEFT's exact semantics and file format.

torch's MultiheadAttention has no Linear sub-layer for q/k/v to hook: it reads ``in_proj_weight``
(3E, E) directly, and reads ``out_proj.weight`` without calling ``out_proj``'s forward. So an
adapter here is two LoRA pairs turned into weights for the duration of one forward:

    in_proj_weight'  = W_in + s·B·A                        A: (r, E),  B: (3E, r)
    out_proj.weight' = (W_out + s·B_o·A_o) + s·B_o·A_o     A_o: (r, E), B_o: (E, r)

The out_proj delta is added **twice**: that is what PEFT ≤ 0.21 computes (its MHA merge adds the
delta itself and then calls the out_proj LoRA layer's own merge, which adds it again), and an
adapter trained there only gives its outputs back with the same arithmetic. As in PEFT, only the
first of the two additions carries a gradient. PEFT does this by mutating the module's weights
around each forward; here the effective weights are passed through ``torch.func.functional_call``,
so the base weights are never touched (no drift from merge/unmerge rounding) and outputs are
bit-identical to PEFT's.

File keys (PEFT's, see ``lorakit.core.adapter_weights``): the in_proj pair under the module's
path, the out_proj pair under the inner module's ``out_proj``.

Only packed q/k/v (``_qkv_same_embed_dim``, the default) is supported, like in PEFT. LoRA dropout
doesn't apply (the adapter acts on weights; PEFT ignores it too). A per-row adapter choice runs
the attention once per adapter on that adapter's rows (batch items are independent in attention).
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch
import torch.nn as nn
from torch.func import functional_call

from lorakit.core.layers.base import LoraAdapter, LoraLayer, RowRouting
from lorakit.errors import TargetModuleError

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_PLAIN_INITS = (True, False, "gaussian")


class MhaAdapter(LoraAdapter):
    """One adapter on a MultiheadAttention: (lora_a, lora_b) for in_proj, (out_a, out_b) for out_proj."""

    custom_math = True

    def __init__(self, a_shape, b_shape, rank, alpha, dropout, rule="lora", scale_rank=None):
        super().__init__(a_shape, b_shape, rank, alpha, 0.0, rule, scale_rank)
        embed_dim = a_shape[1]
        self.out_a = nn.Parameter(torch.empty(rank, embed_dim))
        self.out_b = nn.Parameter(torch.empty(embed_dim, rank))

    def tensor_roles(self) -> dict[str, str]:
        return {**super().tensor_roles(), "out_a": "out_a", "out_b": "out_b"}

    def delta(self, layer: LoraLayer) -> torch.Tensor:
        """The in_proj delta s·B·A (3E, E) in fp32; see :meth:`out_delta` for out_proj."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scaling

    def in_delta(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a) * self.scaling  # (3E, E), PEFT's order, with autograd

    def out_delta(self) -> torch.Tensor:
        return (self.out_b @ self.out_a) * self.scaling  # (E, E)

    def effective_weights(self, w_in: torch.Tensor, w_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_in + Δ_in, W_out + Δ_out + Δ_out) in the weights' dtype, PEFT's arithmetic step by step."""
        w_in = w_in + self.in_delta().to(w_in.dtype)
        d_out = self.out_delta()
        w_out = w_out + d_out.to(w_out.dtype)
        # the second addition is in place on `.data` in PEFT: promoted arithmetic, no gradient
        w_out = (w_out.to(d_out.dtype) + d_out.detach()).to(w_out.dtype)
        return w_in, w_out

    def output(self, layer: LoraLayer, x, result):
        raise NotImplementedError("a MultiheadAttention adapter runs through LoraMultiheadAttention.forward")

    def merge_into(self, layer: LoraMultiheadAttention, safe: bool = True) -> None:
        base = layer.base
        w_in, w_out = self.effective_weights(base.in_proj_weight.detach(), base.out_proj.weight.detach())
        if safe and not (torch.isfinite(w_in).all() and torch.isfinite(w_out).all()):
            raise ValueError("the adapter has NaN/inf weights; refusing to merge it into the base")
        base.in_proj_weight.data.copy_(w_in)
        base.out_proj.weight.data.copy_(w_out)

    def unmerge_from(self, layer: LoraMultiheadAttention) -> None:
        base = layer.base
        w_in, w_out = base.in_proj_weight.data, base.out_proj.weight.data
        d_out = self.out_delta()
        w_in.copy_(w_in - self.in_delta().to(w_in.dtype))
        w_out.copy_((w_out.to(d_out.dtype) - d_out).to(w_out.dtype) - d_out.to(w_out.dtype))


class LoraMultiheadAttention(LoraLayer):
    """A MultiheadAttention with LoRA on its packed q/k/v projection and its output projection."""

    kind = "mha"

    def __init__(self, base: nn.MultiheadAttention):
        if not base._qkv_same_embed_dim:
            raise TargetModuleError(
                "LoRA on a MultiheadAttention needs packed q/k/v weights (kdim == vdim == embed_dim), as in PEFT; "
                "this one has separate q/k/v weights. Exclude it from target_modules"
            )
        if not isinstance(base.out_proj, nn.Linear):
            raise TargetModuleError(f"MultiheadAttention.out_proj must be an nn.Linear, got {type(base.out_proj)}")
        super().__init__(base)

    @property
    def in_features(self) -> int:
        return self.base.embed_dim

    @property
    def out_features(self) -> int:
        return 3 * self.base.embed_dim

    @property
    def _qkv_same_embed_dim(self) -> bool:
        # Reported False while adapters are attached: torch's fused TransformerEncoderLayer fast path
        # reads the raw in_proj/out_proj weights and would silently skip LoRA; "not packed" makes it
        # take the regular path, which calls this module.
        return not self.adapters and self.base._qkv_same_embed_dim

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "adapters"):
                raise
            return getattr(self.base, name)  # embed_dim, num_heads, batch_first, in_proj_weight, ...

    def add_adapter(self, name, rank, alpha, dropout=0.0, init=True, adapter_cls=LoraAdapter, rule="lora",
                    scale_rank=None):
        if adapter_cls is not LoraAdapter:
            raise TargetModuleError(
                f"{adapter_cls.__name__} is not available on nn.MultiheadAttention (PEFT supports plain LoRA there "
                "only); use plain LoRA on this layer or exclude it"
            )
        if init not in _PLAIN_INITS:
            raise TargetModuleError(
                f"init_lora_weights={init!r} is not available on nn.MultiheadAttention; use True, False or "
                "'gaussian' for this layer, or exclude it"
            )
        if dropout:
            warnings.warn(f"lora_dropout={dropout} is ignored on nn.MultiheadAttention: its LoRA acts on weights, "
                          "not inputs (PEFT ignores it there too)", stacklevel=3)
        return super().add_adapter(name, rank, alpha, 0.0, init, MhaAdapter, rule, scale_rank)

    @torch.no_grad()
    def reset_adapter(self, adapter: LoraAdapter, init: bool | str) -> None:
        super().reset_adapter(adapter, init)  # the in_proj pair; the out_proj pair by the same rule:
        if init == "gaussian":
            nn.init.normal_(adapter.out_a, std=1 / adapter.rank)
        else:
            nn.init.kaiming_uniform_(adapter.out_a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(adapter.out_b, a=math.sqrt(5))
        else:
            nn.init.zeros_(adapter.out_b)

    def adapter_placement(self) -> dict:
        weight = self.base.in_proj_weight
        return {"device": weight.device, "dtype": torch.float64 if weight.dtype == torch.float64 else torch.float32}

    def base_weight(self) -> torch.Tensor:
        return self.base.in_proj_weight

    def delta_from(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return b @ a  # (3E, E): the in_proj part only

    # ------------------------------------------------------------------ forward
    def forward(self, query: torch.Tensor, *args, **kwargs):
        call = _SIGNATURE.bind(self.base, query, *args, **kwargs).arguments
        call.pop("self")
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base(**call)
        if self.routing is not None:
            if self.merged_adapters:
                raise RuntimeError("a per-row adapter choice needs unmerged adapters: call unmerge_adapter() first")
            return self._mixed_forward(call, self.routing)
        names = [n for n in self.active_adapters if n in self.adapters and n not in self.merged_adapters]
        return self._run(call, names)

    def _run(self, call: dict, names: list[str]):
        if not names:
            return self.base(**call)
        w_in, w_out = self.base.in_proj_weight, self.base.out_proj.weight
        for name in names:  # in order, as PEFT merges them
            w_in, w_out = self.adapters[name].effective_weights(w_in, w_out)
        return functional_call(self.base, {"in_proj_weight": w_in, "out_proj.weight": w_out}, (), call,
                               strict=False)

    def _mixed_forward(self, call: dict, routing: RowRouting):
        query = call["query"]
        if query.dim() != 3:
            raise RuntimeError("a per-row adapter choice needs batched (3-D) attention inputs; this input is "
                               f"unbatched ({query.dim()}-D), so its rows are tokens that attend to each other")
        batch_dim = 0 if self.base.batch_first else 1
        n = query.shape[batch_dim]
        if routing.row_index.numel() != n:
            raise ValueError(f"adapter_names has {routing.row_index.numel()} entries but the batch has {n} rows")
        out = weights = None
        for g in sorted(set(routing.row_index.tolist())):
            rows = (routing.row_index == g).nonzero().squeeze(1).to(query.device)
            name = routing.names[g] if g >= 0 else None
            sub_out, sub_weights = self._run(_rows_of(call, rows, batch_dim, self.base.num_heads, n),
                                             [name] if name in self.adapters else [])
            if out is None:
                out = sub_out.new_empty(sub_out.shape[:batch_dim] + (n,) + sub_out.shape[batch_dim + 1:])
                if sub_weights is not None:
                    weights = sub_weights.new_empty((n,) + sub_weights.shape[1:])
            out.index_copy_(batch_dim, rows, sub_out)
            if weights is not None:
                weights.index_copy_(0, rows, sub_weights)
        return out, weights


def _rows_of(call: dict, rows: torch.Tensor, batch_dim: int, heads: int, n: int) -> dict:
    """The attention arguments restricted to batch items `rows` (masks included)."""
    sub = dict(call)
    for key in ("query", "key", "value"):
        sub[key] = call[key].index_select(batch_dim, rows)
    if call.get("key_padding_mask") is not None:
        sub["key_padding_mask"] = call["key_padding_mask"].index_select(0, rows)
    mask = call.get("attn_mask")
    if mask is not None and mask.dim() == 3:  # (N·heads, L, S): one mask per item and head
        sub["attn_mask"] = mask.view(n, heads, *mask.shape[1:]).index_select(0, rows).flatten(0, 1)
    return sub
