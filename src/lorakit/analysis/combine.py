"""Combine several adapters into one, layer by layer.

    target_l = Σ_i w_i·ΔW_i,l   (ties / dare: a sparsified, sign-resolved version of it)

Methods:
* ``concat`` — exact: A = [A_1; …; A_n], B = [w_1 s_1 B_1, …] / s_out; rank Σ r_i.
* ``linear`` — the exact weighted sum, re-factored by SVD of the stacked factors and kept at its
  numerical rank (≤ Σ r_i; equal to r when the adapters span the same subspaces). Ranks may differ
  between adapters: nothing is padded or cut, so the result is lossless. (PEFT's ``linear`` instead
  averages the A's and B's separately, which is not Σ w_i ΔW_i.)
* ``svd`` — the weighted sum truncated to rank K (default: the largest input rank).
* ``ties`` / ``dare`` — TIES-Merging / DARE on the dense ΔW of each layer, then truncated to rank K.

Each layer keeps the first adapter's alpha (and rsLoRA setting); scaling becomes α/rank_out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.analysis.errors import IncompatibleAdaptersError, RankError
from lorakit.analysis.factors import read_adapter, write_adapter
from lorakit.core import arithmetic as ar
from lorakit.core.adapter_weights import AdapterWeights, TargetWeights

METHODS = ("linear", "concat", "svd", "ties", "dare")


@dataclass
class LayerCombination:
    name: str
    rank: int
    relative_error: float  # ‖target − result‖_F / ‖target‖_F (0 for concat and linear)


@dataclass
class CombineReport:
    sources: list[str]
    out: str
    method: str
    weights: list[float]
    layers: list[LayerCombination]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_compatible(adapters: Sequence[AdapterWeights]) -> None:
    """Same layers with the same ΔW shapes and kinds, or IncompatibleAdaptersError naming the layer."""
    first = adapters[0]
    for other in adapters[1:]:
        missing = sorted(set(first.targets) ^ set(other.targets))
        if missing:
            name = missing[0]
            has, lacks = (first, other) if name in first.targets else (other, first)
            raise IncompatibleAdaptersError(
                f"layer {name} is adapted by {has.source} but not by {lacks.source} "
                f"({len(missing)} layer(s) differ); combine needs adapters on the same layers"
            )
        for name, layer in first.targets.items():
            o = other.targets[name]
            if layer.shape != o.shape or layer.kind != o.kind:
                raise IncompatibleAdaptersError(
                    f"layer {name}: ΔW is {layer.kind} {layer.shape} in {first.source} but {o.kind} {o.shape} "
                    f"in {other.source}; the adapters were trained on different base models"
                )


def combine_layers(adapters: Sequence[AdapterWeights], weights: Sequence[float], method: str, rank: int | None = None,
                   density: float | None = None, seed: int = 0,
                   ) -> tuple[dict[str, TargetWeights], list[LayerCombination]]:
    """Combined factors for every layer, and each layer's rank and relative error."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not adapters:
        raise ValueError("combine needs at least one adapter")
    if len(weights) != len(adapters):
        raise ValueError(f"--weights needs one number per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if method in ("concat", "linear") and rank is not None:
        raise ValueError(f"--rank does not apply to {method} (it is exact); use --method svd to choose a rank")
    if method in ("ties", "dare"):
        if density is None or not 0.0 < density <= 1.0:
            raise ValueError(f"--method {method} needs --density in (0, 1], got {density}")
    elif density is not None:
        raise ValueError(f"--density applies to ties and dare only, not {method}")
    if rank is not None and rank < 1:
        raise RankError(f"--rank must be at least 1, got {rank}")
    check_compatible(adapters)

    dtype = adapters[0].dtype
    eps = torch.finfo(dtype if dtype.is_floating_point else torch.float32).eps  # "zero" σ at the inputs' precision
    generator = torch.Generator().manual_seed(seed)  # dare: one stream, layers in sorted order
    out: dict[str, TargetWeights] = {}
    report: list[LayerCombination] = []
    for name, first in adapters[0].targets.items():
        layers = [a.targets[name] for a in adapters]
        factors = [lay.factors for lay in layers]
        k = rank if rank is not None else max(lay.rank for lay in layers)
        if method == "concat":
            k = sum(lay.rank for lay in layers)
            new = ar.concat(factors, weights, first.scaling_at(k))
        elif method in ("linear", "svd"):
            svd = ar.thin_svd(ar.stack(factors, weights))  # of Σ w_i ΔW_i, from the stacked factors
            limit = min(sum(lay.rank for lay in layers), *first.shape)
            if method == "linear":
                k = max(1, ar.numerical_rank(svd.s, first.shape, eps))
            elif rank is None:
                k = min(k, limit)
            elif k > limit:
                raise RankError(f"--rank {k} is larger than the weighted sum can have at layer {name} "
                                f"(at most {limit} = min(Σ r_i, d, k))")
            new = ar.balanced_factors(svd, k, first.scaling_at(k))
        else:
            if k > min(first.shape):
                raise RankError(f"--rank {k} is larger than layer {name}'s ΔW {first.shape} allows")
            deltas = [ar.delta_weight(f) for f in factors]  # (d, k) each
            if method == "ties":
                merged = ar.ties_merge(deltas, weights, density)  # type: ignore[arg-type]
            else:
                merged = ar.dare_merge(deltas, weights, density, generator)  # type: ignore[arg-type]
            new = ar.factorize(merged, k, first.scaling_at(k))
        out[name] = first.with_factors(new.lora_a, new.lora_b)
        report.append(LayerCombination(name, k, new.relative_error))
    return out, report


def combine(sources: Sequence[str | os.PathLike], out: str | os.PathLike, weights: Sequence[float] | None = None,
            method: str = "linear", rank: int | None = None, density: float | None = None,
            seed: int = 0) -> CombineReport:
    """Read adapters, combine them (see module doc) and write a PEFT-format adapter to `out`.

    weights default to 1/n each. The output's config (targets, task type, base model) is the first
    adapter's; its non-LoRA tensors (modules_to_save) are the first adapter's too.
    """
    if any(Path(out).resolve() == Path(s).resolve() for s in sources):
        raise ValueError(f"--out {out} is one of the inputs; write the combined adapter somewhere else")
    adapters = [read_adapter(s) for s in sources]
    weights = [1.0 / len(adapters)] * len(adapters) if weights is None else [float(w) for w in weights]
    layers, report = combine_layers(adapters, weights, method, rank=rank, density=density, seed=seed)
    write_adapter(out, layers, adapters[0].config, adapters[0].other, adapters[0].dtype)
    return CombineReport([str(s) for s in sources], str(out), method, list(weights), report)
