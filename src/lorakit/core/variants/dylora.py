"""DyLoRA (Valipour et al. 2023): nested-rank training, so one adapter works at every rank b ≤ r.

    ΔW_b = (α/b) · B[:, :b] · A[:b]          (α/√b with use_rslora)

Each training step uses a rank b drawn uniformly from 1..r (the same b in every layer); the draw
for step t is a pure function of (seed, t), so a resumed run sees the same ranks. The trainer's
hook (:class:`DyLoraController`, from :func:`lorakit.core.variants.training_hooks`) sets it after
every optimizer step; without the hook, training uses the full rank r (plain LoRA). In eval mode
the adapter runs at its ``active_rank`` (default r): :func:`set_rank` picks it and
:func:`rank_sweep` evaluates every rank. The file is a plain rank-r LoRA folder (``use_dylora``
is a lorakit-only key): PEFT loads it as the full-rank adapter, whose scaling α/r is DyLoRA's at b = r.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from lorakit.core.adapter_weights import scaling
from lorakit.core.layers import LoraAdapter, LoraLayer
from lorakit.errors import ConfigError


class DyLoraAdapter(LoraAdapter):
    """LoRA whose leading b rank components form a working adapter for every b ≤ r."""

    custom_math = True

    def setup(self, layer: LoraLayer, config) -> None:
        self.active_rank = self.rank  # used in eval mode and by merge
        self.train_rank = self.rank  # used in training mode; the controller re-draws it every step
        self.merged_rank: int | None = None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, active_rank={self.active_rank}, alpha={self.alpha}, dylora=True"

    def scaling_at(self, b: int) -> float:
        return scaling(self.alpha, b, self.rule)

    def current_rank(self) -> int:
        return min(self.train_rank if self.training else self.active_rank, self.rank)

    def delta_at(self, layer: LoraLayer, b: int) -> torch.Tensor:
        """(α/b)·B[:, :b]·A[:b] in the base weight's layout, fp32."""
        return layer.delta_from(self.lora_a[:b].float(), self.lora_b[:, :b].float()) * self.scaling_at(b)

    def delta(self, layer: LoraLayer) -> torch.Tensor:
        return self.delta_at(layer, self.merged_rank or min(self.active_rank, self.rank))

    def output(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        b = self.current_rank()
        x = layer.cast_input(x, self.lora_a.dtype)
        u = layer.project_a(self.dropout(x), self.lora_a[:b])  # (..., b)
        return result + (layer.project_b(u, self.lora_b[:, :b]) * self.scaling_at(b)).to(result.dtype)

    def merge_into(self, layer: LoraLayer, safe: bool = True) -> None:
        self.merged_rank = min(self.active_rank, self.rank)
        try:
            super().merge_into(layer, safe)
        except ValueError:
            self.merged_rank = None
            raise

    def unmerge_from(self, layer: LoraLayer) -> None:
        super().unmerge_from(layer)
        self.merged_rank = None


def dylora_adapters(model: torch.nn.Module, adapter_name: str | None = None) -> list[DyLoraAdapter]:
    """Every DyLoRA adapter of the model (only those named `adapter_name` if given)."""
    found = []
    for module in getattr(model, "model", model).modules():
        if isinstance(module, LoraLayer):
            for name, adapter in module.adapters.items():
                if isinstance(adapter, DyLoraAdapter) and adapter_name in (None, name):
                    found.append(adapter)
    return found


def set_rank(model: torch.nn.Module, rank: int, adapter_name: str | None = None) -> None:
    """Run the DyLoRA adapters at rank `rank` (capped at each layer's own r) from now on."""
    adapters = dylora_adapters(model, adapter_name)
    if not adapters:
        raise ConfigError("the model has no DyLoRA adapter (LoraConfig(use_dylora=True))")
    top = max(a.rank for a in adapters)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top:
        raise ConfigError(f"rank must be an integer in 1..{top} (the adapters' r), got {rank!r}")
    if any(a.merged_rank is not None for a in adapters):
        raise ConfigError("a DyLoRA adapter is merged; unmerge it before changing its rank")
    for adapter in adapters:
        adapter.active_rank = rank


def rank_sweep(model: torch.nn.Module, eval_fn: Callable[[torch.nn.Module], float],
               ranks: Iterable[int] | None = None, adapter_name: str | None = None) -> dict[int, float]:
    """{b: eval_fn(model) with the adapters at rank b} for each b (default 1..r); ranks restored after."""
    adapters = dylora_adapters(model, adapter_name)
    if not adapters:
        raise ConfigError("the model has no DyLoRA adapter (LoraConfig(use_dylora=True))")
    ranks = list(ranks) if ranks is not None else list(range(1, max(a.rank for a in adapters) + 1))
    before = [a.active_rank for a in adapters]
    results = {}
    try:
        for b in ranks:
            set_rank(model, b, adapter_name)
            results[b] = float(eval_fn(model))
    finally:
        for adapter, b in zip(adapters, before):
            adapter.active_rank = b
    return results


def plot_rank_sweep(results: dict[int, float] | dict[str, dict[int, float]], path: str | Path,
                    metric: str = "accuracy") -> Path:
    """Save a metric-vs-rank line plot (PNG) of :func:`rank_sweep`'s result, or of several labelled ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = results if all(isinstance(v, dict) for v in results.values()) else {"": results}
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, sweep in series.items():
        ranks = sorted(sweep)
        ax.plot(ranks, [sweep[b] for b in ranks], marker="o", label=label or None)
    if len(series) > 1:
        ax.legend()
    ax.set_xlabel("rank b")
    ax.set_ylabel(metric)
    ax.set_title(f"DyLoRA rank sweep: {metric} vs rank")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class DyLoraController:
    """Draws the training rank b for each step: b_t ~ U{1..r}, a function of (seed, t)."""

    def __init__(self, model: torch.nn.Module, adapter_name: str | None = None, seed: int = 0):
        self.adapter_name, self.seed = adapter_name, seed
        self.adapters = dylora_adapters(model, adapter_name)
        if not self.adapters:
            raise ConfigError("DyLoraController: the model has no DyLoRA adapter")
        self.max_rank = max(a.rank for a in self.adapters)
        self._set(0)

    def rank_for_step(self, step: int) -> int:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return 1 + int(torch.randint(self.max_rank, (1,), generator=g))

    def _set(self, step: int) -> None:
        b = self.rank_for_step(step)
        for adapter in self.adapters:
            adapter.train_rank = b

    def step(self, model: torch.nn.Module, global_step: int) -> None:
        """After optimizer step `global_step`: draw the rank of the next step."""
        self._set(global_step + 1)

    def extra_loss(self, model: torch.nn.Module) -> torch.Tensor:
        return torch.zeros(())
