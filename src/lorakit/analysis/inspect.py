"""What an adapter learned, per layer: norms, singular-value spectra, effective rank, similarity.

    ΔW = s·B·A;  ‖ΔW‖_F = ‖σ‖₂;  eff. rank at energy e = min{k : Σ_{i≤k} σ_i² ≥ e·Σ σ_i²}

Spectra come from the thin factors (see arithmetic.thin_svd); the base weights, when given, are
read one tensor at a time from the checkpoint's safetensors files for ‖W0‖_F.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorakit.analysis.errors import CheckpointError, IncompatibleAdaptersError
from lorakit.analysis.factors import read_adapter
from lorakit.core import arithmetic as ar
from lorakit.core.adapter_weights import AdapterWeights


@dataclass
class LayerStats:
    name: str  # module path in the base model
    kind: str  # linear | embedding | conv
    shape: tuple[int, int]  # (d, k) of ΔW = s·B·A
    rank: int
    alpha: float
    scaling: float
    norm: float  # ‖ΔW‖_F
    singular_values: list[float]  # min(r, d, k) values, descending
    effective_rank_90: int  # components holding 90% of Σσ²
    effective_rank_99: int
    base_norm: float | None = None  # ‖W0‖_F when a base checkpoint was given
    relative_norm: float | None = None  # ‖ΔW‖_F / ‖W0‖_F


@dataclass
class AdapterStats:
    path: str
    r: int
    lora_alpha: float
    use_rslora: bool
    num_params: int  # Σ r·(d + k)
    layers: list[LayerStats]
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass
class LayerSimilarity:
    name: str
    cosine: float  # ⟨ΔW1, ΔW2⟩ / (‖ΔW1‖‖ΔW2‖), nan if either is zero
    norm_a: float
    norm_b: float


@dataclass
class Comparison:
    path_a: str
    path_b: str
    layers: list[LayerSimilarity]  # layers both adapters have
    only_in_a: list[str]
    only_in_b: list[str]
    mean_cosine: float  # over shared layers with a defined cosine
    overall_cosine: float  # ⟨ΔW1, ΔW2⟩ summed over shared layers / product of total norms

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def _jsonable(value: Any) -> Any:
    """nan/inf → None so the JSON is standard; tuples → lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _as_adapter(adapter: AdapterWeights | str | os.PathLike) -> AdapterWeights:
    return adapter if isinstance(adapter, AdapterWeights) else read_adapter(adapter)


def inspect_adapter(adapter: AdapterWeights | str | os.PathLike, base: str | os.PathLike | None = None) -> AdapterStats:
    """Per-layer statistics of ΔW (and ‖ΔW‖/‖W0‖ when `base` is a transformers checkpoint folder)."""
    adapter = _as_adapter(adapter)
    base_norms = base_weight_norms(base, list(adapter.targets)) if base is not None else {}
    layers = []
    for name, layer in adapter.targets.items():
        s = ar.singular_values(layer.factors)  # (min(r, d, k),)
        norm = float(s.norm())
        base_norm = base_norms.get(name)
        layers.append(LayerStats(
            name=name, kind=layer.kind, shape=layer.shape, rank=layer.rank, alpha=layer.alpha,
            scaling=layer.scaling, norm=norm, singular_values=s.tolist(),
            effective_rank_90=ar.effective_rank(s, 0.90), effective_rank_99=ar.effective_rank(s, 0.99),
            base_norm=base_norm, relative_norm=(norm / base_norm) if base_norm else None,
        ))
    config = adapter.config
    stats = AdapterStats(path=str(adapter.source), r=int(config.get("r", 8)), lora_alpha=config.get("lora_alpha", 8),
                         use_rslora=bool(config.get("use_rslora", False)), num_params=adapter.num_params,
                         layers=layers)
    stats.summary = summarize(layers)
    return stats


def summarize(layers: list[LayerStats]) -> dict[str, Any]:
    """Totals and averages across layers, and the layers that stand out."""
    norms = [lay.norm for lay in layers]
    top = max(layers, key=lambda lay: lay.norm)
    summary: dict[str, Any] = {
        "num_layers": len(layers),
        "total_norm": math.sqrt(sum(n * n for n in norms)),  # ‖ΔW‖_F over all layers together
        "mean_norm": statistics.fmean(norms),
        "largest_norm_layer": top.name,
        "mean_effective_rank_90": statistics.fmean(lay.effective_rank_90 for lay in layers),
        "mean_effective_rank_99": statistics.fmean(lay.effective_rank_99 for lay in layers),
        # how much of the allotted rank carries 99% of the energy (1.0: all of it)
        "rank_utilisation_99": statistics.fmean(lay.effective_rank_99 / lay.rank for lay in layers),
    }
    relative = [lay.relative_norm for lay in layers if lay.relative_norm is not None]
    if relative:
        summary["mean_relative_norm"] = statistics.fmean(relative)
        summary["max_relative_norm"] = max(relative)
    return summary


def compare_adapters(a: AdapterWeights | str | os.PathLike, b: AdapterWeights | str | os.PathLike) -> Comparison:
    """Per-layer cosine similarity of ΔW between two adapters, from their factors."""
    a, b = _as_adapter(a), _as_adapter(b)
    shared = [n for n in a.targets if n in b.targets]
    if not shared:
        raise IncompatibleAdaptersError(f"{a.source} and {b.source} adapt no common layer "
                                        f"(e.g. {next(iter(a.targets))} vs {next(iter(b.targets))})")
    rows, inner_total, norm_a2, norm_b2 = [], 0.0, 0.0, 0.0
    for name in shared:
        fa, fb = a.targets[name], b.targets[name]
        if fa.shape != fb.shape:
            raise IncompatibleAdaptersError(f"layer {name}: ΔW is {fa.shape} in {a.source} but {fb.shape} in {b.source}")
        inner = ar.frobenius_inner(fa.factors, fb.factors)
        na, nb = ar.frobenius_norm(fa.factors), ar.frobenius_norm(fb.factors)
        rows.append(LayerSimilarity(name, inner / (na * nb) if na * nb > 0 else float("nan"), na, nb))
        inner_total, norm_a2, norm_b2 = inner_total + inner, norm_a2 + na * na, norm_b2 + nb * nb
    defined = [r.cosine for r in rows if not math.isnan(r.cosine)]
    return Comparison(
        path_a=str(a.source), path_b=str(b.source), layers=rows,
        only_in_a=[n for n in a.targets if n not in b.targets], only_in_b=[n for n in b.targets if n not in a.targets],
        mean_cosine=statistics.fmean(defined) if defined else float("nan"),
        overall_cosine=inner_total / math.sqrt(norm_a2 * norm_b2) if norm_a2 * norm_b2 > 0 else float("nan"),
    )


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted({folder / f for f in weight_map.values()})
    return sorted(folder.glob("*.safetensors"))


def base_weight_norms(base: str | os.PathLike, names: list[str]) -> dict[str, float]:
    """‖W0‖_F for each module name, read from a transformers checkpoint folder (safetensors).

    A module's weight key is `<name>.weight`, or the one checkpoint key that ends with
    `.<name>.weight` (checkpoints of a bare model may lack the task head's prefix, or vice versa).
    """
    from safetensors import safe_open

    from lorakit.errors import ConfigError
    from lorakit.models import resolve_base

    try:
        folder = resolve_base(base)  # a preset, a folder or a hub id
    except ConfigError as exc:
        raise CheckpointError(f"--base: {exc}") from None
    files = _checkpoint_files(folder) if folder.is_dir() else []
    if not files:
        raise CheckpointError(f"--base {folder} is not a checkpoint folder with *.safetensors weights")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as fh:
            where.update({key: file for key in fh.keys()})
    norms: dict[str, float] = {}
    for name in names:
        key = _match_key(name, where)
        if key is None:
            continue
        with safe_open(where[key], framework="pt") as fh:
            norms[name] = float(fh.get_tensor(key).double().norm())
    return norms


def _match_key(name: str, keys: dict[str, Path]) -> str | None:
    if f"{name}.weight" in keys:
        return f"{name}.weight"
    # strip leading components of the module name, then look for a unique suffix match
    parts = name.split(".")
    for start in range(len(parts)):
        suffix = ".".join(parts[start:]) + ".weight"
        hits = [k for k in keys if k == suffix or k.endswith("." + suffix)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            return None
    return None
