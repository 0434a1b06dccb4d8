"""PNG of an adapter's per-layer spectra and norms (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.analysis.inspect import AdapterStats


def plot_stats(stats: AdapterStats, out: str | os.PathLike) -> Path:
    """Three panels: σ_i/σ_1 per layer (log scale), ‖ΔW‖ per layer (or ‖ΔW‖/‖W0‖), effective ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = stats.layers
    names = [lay.name for lay in layers]
    fig, (ax_spec, ax_norm, ax_rank) = plt.subplots(3, 1, figsize=(max(8.0, 0.28 * len(layers) + 4), 11))
    cmap = plt.get_cmap("viridis")
    for i, lay in enumerate(layers):
        s = lay.singular_values
        if s and s[0] > 0:
            ax_spec.semilogy(range(1, len(s) + 1), [v / s[0] for v in s], color=cmap(i / max(1, len(layers) - 1)),
                             alpha=0.7, lw=1)
    ax_spec.set_xlabel("singular value index i")
    ax_spec.set_ylabel("σ_i / σ_1")
    ax_spec.set_title(f"{stats.path}: ΔW spectra, {len(layers)} layers (colour = layer order)")
    ax_spec.grid(True, which="both", alpha=0.3)

    relative = all(lay.relative_norm is not None for lay in layers)
    values = [lay.relative_norm if relative else lay.norm for lay in layers]
    ax_norm.bar(range(len(layers)), values, color="tab:blue")
    ax_norm.set_ylabel("‖ΔW‖_F / ‖W0‖_F" if relative else "‖ΔW‖_F")
    ax_norm.set_xticks(range(len(layers)), [], rotation=90)

    x = range(len(layers))
    ax_rank.bar([i - 0.2 for i in x], [lay.effective_rank_90 for lay in layers], width=0.4, label="90% energy")
    ax_rank.bar([i + 0.2 for i in x], [lay.effective_rank_99 for lay in layers], width=0.4, label="99% energy")
    ax_rank.plot(list(x), [lay.rank for lay in layers], "k_", markersize=12, label="rank r")
    ax_rank.set_ylabel("effective rank")
    ax_rank.set_xticks(list(x), names, rotation=90, fontsize=6)
    ax_rank.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
