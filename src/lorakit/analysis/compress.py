"""Shrink an adapter by truncated SVD of each layer's ΔW.

    ΔW ≈ U_k Σ_k V_kᵀ,   relative error = √(Σ_{i>k} σ_i²) / ‖ΔW‖_F

--rank K keeps K components everywhere; --energy e keeps, per layer, the fewest components that
hold a fraction e of Σσ². Each layer keeps its alpha, so its scaling becomes α/k (α/√k with
rsLoRA); the output's r is the most common new rank, the others go to rank_pattern.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorakit.analysis.errors import RankError
from lorakit.analysis.factors import read_adapter, write_adapter
from lorakit.core import arithmetic as ar
from lorakit.core.adapter_weights import AdapterWeights, TargetWeights


@dataclass
class LayerCompression:
    name: str
    old_rank: int
    new_rank: int
    relative_error: float  # ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F
    energy_kept: float  # Σ_{i≤k} σ_i² / Σ σ_i²


@dataclass
class CompressReport:
    source: str
    out: str
    old_params: int
    new_params: int
    layers: list[LayerCompression]

    @property
    def max_relative_error(self) -> float:
        return max(lay.relative_error for lay in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_relative_error": self.max_relative_error}


def compress_layers(adapter: AdapterWeights, rank: int | None = None, energy: float | None = None,
                    ) -> tuple[dict[str, TargetWeights], list[LayerCompression]]:
    """Truncated-SVD factors per layer: to `rank` everywhere, or to the rank holding `energy`."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank (an int) or energy (a fraction in (0, 1])")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if rank is not None:
        if rank < 1:
            raise RankError(f"--rank must be at least 1, got {rank}")
        too_small = [n for n, lay in adapter.targets.items() if lay.rank < rank]
        if too_small:
            have = adapter.targets[too_small[0]].rank
            raise RankError(f"--rank {rank} is larger than layer {too_small[0]}'s rank {have} "
                            f"({len(too_small)} layer(s) affected); compression can only lower the rank")
    out: dict[str, TargetWeights] = {}
    report: list[LayerCompression] = []
    for name, layer in adapter.targets.items():
        svd = ar.thin_svd(layer.factors)
        k = rank if rank is not None else max(1, ar.effective_rank(svd.s, energy))  # type: ignore[arg-type]
        new = ar.balanced_factors(svd, k, layer.scaling_at(k))
        out[name] = layer.with_factors(new.lora_a, new.lora_b)
        total = float((svd.s**2).sum())
        kept = float((svd.s[:k] ** 2).sum()) / total if total > 0 else 1.0
        report.append(LayerCompression(name, layer.rank, k, new.relative_error, kept))
    return out, report


def compress(source: str | os.PathLike, out: str | os.PathLike, rank: int | None = None,
             energy: float | None = None) -> CompressReport:
    """Read the adapter at `source`, compress it, and write a PEFT-format adapter to `out`."""
    if Path(out).resolve() == Path(source).resolve():
        raise ValueError(f"--out {out} is the source adapter; write the compressed copy somewhere else")
    adapter = read_adapter(source)
    layers, report = compress_layers(adapter, rank=rank, energy=energy)
    write_adapter(out, layers, adapter.config, adapter.other, adapter.dtype)
    return CompressReport(str(source), str(out), adapter.num_params,
                          sum(lay.num_params for lay in layers.values()), report)
