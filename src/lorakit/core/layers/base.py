"""What every LoRA layer shares: named adapters around a wrapped base module.

A layer computes ``h = base(x) + Σ_active scaling · B·A·dropout(x)`` where the product B·A is
never formed in the forward pass: the input goes through A (rank r) and then through B. The
weight delta ``scaling · B·A`` is formed in exactly one place, :meth:`LoraLayer.delta_weight`,
which merge, unmerge, inspection and export all use.

Subclasses describe their geometry with three small methods:

* ``project_a(x, A)``: the input through A, giving the rank-r activations ``u``;
* ``project_b(u, B)``: ``u`` through B, giving a tensor shaped like the base output;
* ``delta_from(A, B)``: the dense weight delta in the base weight's layout.

The mixed-batch path (one adapter per row) never loops over rows. Without autograd (serving,
evaluation) layers that can (``row_gather``: Linear-like) gather each row's own factors from a
stacked per-layer pool by slot (:mod:`lorakit.core.routing`), so a batch over k adapters costs two
rank-r products per row whatever k is. With autograd (or dropout, or other geometries) the factors
are concatenated along the rank axis and masked per row: two matmuls of rank Σr.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.modules.module as _module_hooks

from lorakit.core.adapter_weights import TargetWeights, scaling
from lorakit.core.routing import FactorPool, Routed, RowRouting
from lorakit.errors import AdapterError


class LoraAdapter(nn.Module):
    """The trainable factors of one adapter on one layer: ΔW = scaling · B·A.

    ``lora_a`` is (r, in, *kernel) and ``lora_b`` is (out, r, *1s). Variants (``lorakit.core.variants``)
    subclass this, set ``custom_math = True`` and override ``output``, ``delta``, ``merge_into`` and
    ``unmerge_from``; the layer then routes through those instead of its fast paths.
    """

    custom_math = False

    def __init__(self, a_shape: Sequence[int], b_shape: Sequence[int], rank: int, alpha: float,
                 dropout: float, rule: str = "lora", scale_rank: float | None = None):
        super().__init__()
        self.rank = rank
        self.alpha = alpha
        self.rule = rule  # the scaling rule (lorakit.core.adapter_weights.scaling)
        # one place computes it; a float attribute so the hot paths don't call a function
        self.scaling = scaling(alpha, scale_rank if scale_rank is not None else rank, rule)
        self.lora_a = nn.Parameter(torch.empty(*a_shape))
        self.lora_b = nn.Parameter(torch.empty(*b_shape))
        # nn.Identity when p == 0 so the input is never copied (torchtune does the same)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:.4g}"

    def setup(self, layer: LoraLayer, config) -> None:
        """Called once right after the adapter is added to `layer` (variants create extra tensors here)."""

    def tensor_roles(self) -> dict[str, str]:
        """role -> attribute for every tensor this adapter saves (variants add theirs).

        Roles are :class:`~lorakit.core.adapter_weights.TargetWeights`' names; the adapter type
        turns them into PEFT's key names.
        """
        return {"lora_a": "lora_a", "lora_b": "lora_b"}

    def scaling_rank(self) -> float | torch.Tensor:
        """The rank the scaling rule divides by (AdaLoRA: its ranknum)."""
        return self.rank

    # The four hooks a variant overrides. `layer` supplies the geometry (project_a/b, delta_from).
    def delta(self, layer: LoraLayer) -> torch.Tensor:
        """ΔW = scaling · B·A in the base weight's layout, fp32."""
        return layer.delta_from(self.lora_a.float(), self.lora_b.float()) * self.scaling

    def output(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The layer output with this adapter applied on top of `result` (the base output)."""
        x = layer.cast_input(x, self.lora_a.dtype)
        u = layer.project_a(self.dropout(x), self.lora_a)  # (..., r)
        # no cast here: on a half-precision base the sum is formed in the adapter's fp32 and rounded
        # once at the end of the layer (LoraLayer.forward), PEFT's order of casts
        return result + layer.project_b(u, self.lora_b) * self.scaling

    def merge_into(self, layer: LoraLayer, safe: bool = True) -> None:
        delta = self.delta(layer)
        if safe and not torch.isfinite(delta).all():
            raise ValueError("the adapter has NaN/inf weights; refusing to merge it into the base")
        layer.add_to_base_weight(delta)

    def unmerge_from(self, layer: LoraLayer) -> None:
        layer.add_to_base_weight(-self.delta(layer))


def output_may_be_kept(module: nn.Module) -> bool:
    """Whether a forward hook could hold on to `module`'s output, so adding into it in place would show there.

    The no-grad fast paths add the LoRA term into the base output in place; with a forward hook on the
    base (activation caching, patching) they add out of place instead, as the general path does.
    """
    return bool(module._forward_hooks or _module_hooks._global_forward_hooks)


def _factors(adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of an adapter, read from its parameter dict when they live there (the fast case)."""
    params = adapter._parameters
    lora_a, lora_b = params.get("lora_a"), params.get("lora_b")
    return (adapter.lora_a if lora_a is None else lora_a), (adapter.lora_b if lora_b is None else lora_b)


class LoraLayer(Routed, nn.Module):
    """A base module wrapped with any number of named LoRA adapters.

    Args:
        base: the module to wrap; its parameters are frozen (nested LoRA wrappers' adapters are not).
    """

    kind = "linear"  # TargetWeights.kind of this layer's adapters
    # project_a/project_b are plain x·Aᵀ / u·Bᵀ on the last axis: the routed forward may gather per row
    row_gather = False

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []  # a stack: unmerge pops in reverse order
        self.disabled = False
        # set by LoraModel for the duration of one forward: (adapter name per row)
        self.routing: RowRouting | None = None
        frozen = base
        while isinstance(frozen, LoraLayer):  # nested wrappers: freeze the module, not inner adapters
            frozen = frozen.base
        for p in frozen.parameters():
            p.requires_grad_(False)
        self.train(base.training)  # a wrapper added to an eval-mode model is in eval mode too

    # ------------------------------------------------------------------ geometry (subclasses)
    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, self.in_features), (self.out_features, rank)

    def project_a(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project_b(self, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_from(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adapter_placement(self) -> dict:
        """Device and dtype for new adapter factors: the base's device; fp32 unless the base is fp64.

        Half-precision bases get fp32 adapters, as PEFT does by default: the factors are tiny and
        Adam updates on bf16 weights lose most of their bits.
        """
        param = next(self.base.parameters(), None)
        if param is None:
            param = next(self.base.buffers())
        dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
        return {"device": param.device, "dtype": dtype}

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as a dense tensor (dequantised for a 4-bit base)."""
        if hasattr(self.base, "dequantize"):
            return self.base.dequantize()
        return self.base.weight

    def add_to_base_weight(self, delta: torch.Tensor) -> None:
        """W += delta in place, computed in fp32 and cast back to W's dtype."""
        if hasattr(self.base, "add_to_weight_"):
            self.base.add_to_weight_(delta)
            return
        weight = self.base_weight()
        weight.data.copy_((weight.data.float() + delta.float()).to(weight.dtype))

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0, init: bool | str = True,
                    adapter_cls: type[LoraAdapter] = LoraAdapter, rule: str = "lora",
                    scale_rank: float | None = None) -> LoraAdapter:
        """Add adapter `name` with fresh factors (B = 0 by default, so ΔW = 0) and return it.

        Args:
            name: the adapter's name (unique on this layer).
            rank: r, the number of rows of A.
            alpha: lora_alpha; the scaling follows from alpha, the rank and `rule`.
            dropout: dropout probability on the LoRA path's input (0: none, no copy of the input).
            init: ``True``/``"kaiming"`` (A Kaiming-uniform, B = 0), ``"gaussian"`` (A ~ N(0, 1/r)),
                ``False`` (both random: a non-zero ΔW, for tests), ``"orthogonal"`` (both zero here;
                the variant's init fills them).
            adapter_cls: the adapter class (a variant from ``lorakit.core.variants``).
            rule: the scaling rule: ``"lora"`` (α/r), ``"rslora"`` (α/√r), ``"adalora"``.
            scale_rank: the rank the rule divides by when it is not `rank` (AdaLoRA's init_r).

        Values from a file go in afterwards with :meth:`import_adapter`.
        """
        if name in self.adapters:
            raise AdapterError(f"this layer already has an adapter named {name!r}")
        a_shape, b_shape = self.adapter_shapes(rank)
        adapter = adapter_cls(a_shape, b_shape, rank, alpha, dropout, rule, scale_rank)
        adapter.to(**self.adapter_placement())
        adapter.train(self.training)
        self.reset_adapter(adapter, init)
        self.adapters[name] = adapter
        return adapter

    @torch.no_grad()
    def reset_adapter(self, adapter: LoraAdapter, init: bool | str) -> None:
        """PEFT's defaults: A Kaiming-uniform (a=√5) or N(0, 1/r); B = 0 so ΔW starts at exactly 0."""
        if init == "orthogonal":  # variants.olora draws both factors, in PEFT's RNG order
            nn.init.zeros_(adapter.lora_a)
            nn.init.zeros_(adapter.lora_b)
            return
        if init == "gaussian":
            nn.init.normal_(adapter.lora_a, std=1 / adapter.rank)
        else:
            nn.init.kaiming_uniform_(adapter.lora_a, a=math.sqrt(5))
        if init is False:  # both random: a non-zero delta, useful for tests
            nn.init.kaiming_uniform_(adapter.lora_b, a=math.sqrt(5))
        else:
            nn.init.zeros_(adapter.lora_b)

    def export_adapter(self, name: str, path: str = "") -> TargetWeights:
        """Adapter `name` on this layer as a :class:`TargetWeights` holding the live tensors (no copy).

        Args:
            name: the adapter.
            path: the target's path as PEFT spells it (the layer doesn't know where it sits).
        """
        adapter = self.adapters[name]
        roles = {role: getattr(adapter, attr) for role, attr in adapter.tensor_roles().items()}
        return TargetWeights(
            path=path, kind=self.kind, lora_a=roles.pop("lora_a"), lora_b=roles.pop("lora_b"), alpha=adapter.alpha,
            rule=adapter.rule, extra=roles, fan_in_fan_out=bool(getattr(self, "fan_in_fan_out", False)),
            groups=int(getattr(self, "groups", 1)),
            scale_rank=adapter.scaling_rank() if adapter.scaling_rank() is not adapter.rank else None)

    @torch.no_grad()
    def import_adapter(self, name: str, weights: TargetWeights) -> None:
        """Copy `weights`' tensors into adapter `name` (every shape is checked before the first copy)."""
        adapter = self.adapters[name]
        given = weights.roles()
        roles = adapter.tensor_roles()
        unknown = sorted(set(given) - set(roles))
        if unknown:
            raise AdapterError(f"{weights.path or name}: this layer's {type(adapter).__name__} has no {unknown[0]!r} "
                               "tensor; the weights are for another variant")
        pairs = [(getattr(adapter, roles[r]), t) for r, t in given.items()]
        for (ref, value), role in zip(pairs, given):
            if tuple(ref.shape) != tuple(value.shape):
                raise AdapterError(f"{weights.path or name}: {role} is {tuple(value.shape)} but this layer's adapter "
                                   f"holds {tuple(ref.shape)}")
        for ref, value in pairs:
            ref.copy_(value.to(dtype=ref.dtype, device=ref.device))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting")
        del self.adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]
        pool = self.factor_pool
        if pool is not None:
            pool.clear(name)

    # ------------------------------------------------------------------ delta, merge
    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling · B·A in the base weight's layout, in fp32."""
        return self.adapters[name].delta(self)

    def check_mergeable(self, names: Sequence[str]) -> None:
        """Raise MergeError, before anything changes, when one of these adapters can't be merged here."""

    @torch.no_grad()
    def merge(self, names: Sequence[str] | None = None, safe: bool = True) -> None:
        """W += ΔW for each named (default: active) adapter not yet merged. Idempotent."""
        names = list(names if names is not None else self.active_adapters)
        self.check_mergeable([n for n in names if n in self.adapters and n not in self.merged_adapters])
        for name in names:
            if name not in self.adapters or name in self.merged_adapters:
                continue
            try:
                self.adapters[name].merge_into(self, safe=safe)
            except ValueError as exc:
                raise ValueError(f"adapter {name!r}: {exc}") from None
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged deltas in reverse order of merging (fp32 arithmetic)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.adapters[name].unmerge_from(self)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base(x, *args, **kwargs)
        result = self.base(x, *args, **kwargs)
        if self.routing is not None:
            if self.merged_adapters:
                raise RuntimeError("a per-row adapter choice needs unmerged adapters: call unmerge_adapter() first")
            if output_may_be_kept(self.base):  # the routed paths add into the base output in place
                result = result.clone()
            return self.mixed_forward(x, result, self.routing)
        dtype = result.dtype
        for name in self.active_adapters:
            if name in self.merged_adapters or name not in self.adapters:
                continue
            result = self.adapters[name].output(self, x, result)
        return result.to(dtype)

    @property
    def factor_pool(self) -> FactorPool | None:
        """This layer's stacked factors by slot (None until a routed forward or a served adapter needs it)."""
        return self.__dict__.get("_factor_pool")

    def ensure_factor_pool(self, like: torch.Tensor) -> FactorPool:
        """The factor pool, created on `like`'s device and dtype, or moved there if the model moved."""
        pool = self.factor_pool
        if pool is None:
            pool = FactorPool(self.in_features, self.out_features, like.device, like.dtype)
            self.__dict__["_factor_pool"] = pool  # not a buffer: never saved, moved or counted
        elif pool.device != like.device:
            pool.a, pool.bt, pool.scale = (t.to(like.device) for t in (pool.a, pool.bt, pool.scale))
            pool.version += 1  # operands gathered on the old device are stale
        return pool

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        """One adapter per row: gathered per row from the factor pool, or concatenated and masked."""
        modules = self.adapters._modules  # looked up once: nn.Module attribute access is slow on this hot path
        present, custom = [], []
        for g, name in enumerate(routing.names):
            adapter = modules.get(name)
            if adapter is not None:
                (custom if adapter.custom_math else present).append((g, name))
        if custom:  # variants with their own math: one pass per adapter over its rows
            result = result.clone()
            for g, name in custom:
                rows = (routing.row_index == g).nonzero().squeeze(1).to(x.device)
                result[rows] = modules[name].output(self, x[rows], result[rows]).to(result.dtype)
        adapters = [modules[n] for _, n in present]
        factors = [_factors(ad) for ad in adapters]
        if self._can_gather(adapters, factors):
            pool = self.ensure_factor_pool(factors[0][0] if factors else result)
            for (_, name), adapter, (lora_a, lora_b) in zip(present, adapters, factors):
                pool.sync(routing.slots[name], name, adapter, lora_a, lora_b)
            pool.reserve(routing.max_slot)
            row_slot = routing.row_slot
            if custom:  # their rows were handled above: route them to the zero slot here
                row_slot = torch.where(torch.isin(routing.row_index, torch.tensor([g for g, _ in custom])),
                                       0, row_slot)
            return pool.forward(x, result, routing, row_slot)
        if present:
            result = self._concat_forward(x, result, routing, present, adapters)
        if routing.pooled and self.factor_pool is not None:  # served (pool-only) adapters: their rows alone
            pool = self.ensure_factor_pool(x)  # follows the model if it moved to another device
            pool.reserve(routing.max_slot)
            result = pool.forward(x, result, routing, routing.pooled_row_slot)
        return result

    def _can_gather(self, adapters: list[LoraAdapter], factors: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Gather per row when no gradient must flow into the factors and dropout is off."""
        if not self.row_gather:
            return False
        if not adapters:
            return self.factor_pool is not None
        if self.training and not all(type(ad._modules["dropout"]) is nn.Identity for ad in adapters):
            return False
        grad = torch.is_grad_enabled()
        pool = self.factor_pool
        dtype = None if pool is None else pool.dtype
        for lora_a, lora_b in factors:
            if grad and (lora_a.requires_grad or lora_b.requires_grad):
                return False
            dtype = lora_a.dtype if dtype is None else dtype
            if lora_a.dtype != dtype or lora_a.dim() != 2:
                return False
        return True

    def _concat_forward(self, x: torch.Tensor, result: torch.Tensor, routing: RowRouting,
                        present: list[tuple[int, str]], adapters: list[LoraAdapter]) -> torch.Tensor:
        """Factors concatenated on the rank axis, masked per row (the autograd-capable path)."""
        dtype = adapters[0].lora_a.dtype
        x = self.cast_input(x, dtype)
        a_cat, b_cat = self._concat_factors(present, adapters)  # (K, in, ...), (out, K, ...), K = Σ r
        mask = routing.mask([(g, ad.rank) for (g, _), ad in zip(present, adapters)], x.device, dtype)  # (N, K)
        if all(isinstance(ad.dropout, nn.Identity) or not self.training for ad in adapters):
            u = self.project_a(x, a_cat)
        else:  # dropout differs per adapter: one pass per adapter (not per row)
            u = torch.cat([self.project_a(ad.dropout(x), ad.lora_a) for ad in adapters], dim=self.rank_dim(x))
        u = u * self.broadcast_mask(mask, u)
        return result + self.project_b(u, b_cat).to(result.dtype)

    def _concat_factors(self, present: list[tuple[int, str]], adapters: list[LoraAdapter]):
        """[A₁; A₂; …] and [s₁B₁, s₂B₂, …] for the adapters in a mixed batch.

        Without autograd (serving) they are cached per adapter set and rebuilt only when a factor
        changes in place (its version counter moves), so a decode step pays no concatenation.
        """
        if torch.is_grad_enabled() and any(ad.lora_a.requires_grad or ad.lora_b.requires_grad for ad in adapters):
            return (torch.cat([ad.lora_a for ad in adapters], dim=0),
                    torch.cat([ad.lora_b * ad.scaling for ad in adapters], dim=1))
        key = tuple((name, id(ad), ad.lora_a._version, ad.lora_b._version, ad.lora_a.data_ptr(),
                     ad.lora_b.data_ptr(), ad.scaling) for (_, name), ad in zip(present, adapters))
        cached = self.__dict__.get("_mixed_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                a_cat = torch.cat([ad.lora_a for ad in adapters], dim=0)
                b_cat = torch.cat([ad.lora_b * ad.scaling for ad in adapters], dim=1)
            cached = (key, a_cat, b_cat)
            self.__dict__["_mixed_cache"] = cached  # not a buffer: never saved, moved or counted
        return cached[1], cached[2]

    def cast_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The input in the adapters' dtype (token ids stay integers)."""
        return x.to(dtype)

    def rank_dim(self, x: torch.Tensor) -> int:
        """The axis of the rank-r activations u (last for Linear/Embedding, 1 for Conv)."""
        return -1

    def broadcast_mask(self, mask: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """(N, K) -> a view that broadcasts against u."""
        if u.shape[0] != mask.shape[0]:
            raise ValueError(
                f"adapter_names has {mask.shape[0]} entries but this layer sees a batch of {u.shape[0]} rows; "
                "pass one adapter name per row of the input batch"
            )
        return mask.view(mask.shape[0], *([1] * (u.dim() - 2)), mask.shape[1])

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}, disabled={self.disabled}"

