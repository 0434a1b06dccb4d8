"""AdaLoRA's rank allocation: importance scores, the cubic budget schedule, triplet masking.

Per trainable entry w (of P, Λ, Q), after each backward (β1, β2 from the config)::

    I = |w · ∂L/∂w|,   Ī ← β1·Ī + (1−β1)·I,   U ← β2·U + (1−β2)·|I − Ī|,   s(w) = Ī·U

and the score of triplet i is  S_i = s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki).  The budget (total
kept triplets over all layers) follows PEFT's schedule, with b0 = Σ initial ranks, bT = target_r ×
layers, T = total_step::

    b(t) = b0                                                   t ≤ tinit
    b(t) = ⌊(b0 − bT)·(1 − (t − tinit)/(T − tfinal − tinit))³ + bT⌋   tinit < t ≤ T − tfinal
    b(t) = bT                                                   t > T − tfinal

Every deltaT steps of the middle phase (and once at t = T − tfinal) the b0 − b(t) lowest-scored
triplets get Λ = 0; after that the final masks are re-applied every step. This mirrors PEFT's
``RankAllocator`` + ``update_and_allocate`` step for step (ties at the threshold are all pruned,
as in PEFT; a zero-size cut prunes nothing where PEFT would raise).
"""

from __future__ import annotations

import torch

from lorakit.core.adapter_weights import adalora_mask_key
from lorakit.core.variants.adalora import (
    AdaLoraAdapter,
    AdaLoraConfig,
    adalora_adapters,
    orthogonal_loss,
    trainable_adalora_name,
)
from lorakit.errors import ConfigError


class AdaLoraController:
    """Budget allocation for one trainable AdaLoRA adapter. Call :meth:`step` after every optimizer step.

        loss = out.loss + controller.extra_loss(model)      # the orthogonality penalty
        loss.backward(); optimizer.step()
        controller.step(model, global_step)                 # before optimizer.zero_grad()
    """

    def __init__(self, model: torch.nn.Module | None = None, adapter_name: str | None = None):
        self.adapter_name = adapter_name
        self.layers: list[tuple[str, AdaLoraAdapter]] = []
        self.config: AdaLoraConfig | None = None
        if model is not None:
            self._bind(model)

    # ------------------------------------------------------------------ setup
    def _bind(self, model: torch.nn.Module) -> None:
        name = self.adapter_name or trainable_adalora_name(model)
        if name is None or name not in getattr(model, "peft_config", {}):
            raise ConfigError("AdaLoraController: the model has no trainable AdaLoRA adapter")
        config = model.peft_config[name]
        if not isinstance(config, AdaLoraConfig):
            raise ConfigError(f"adapter {name!r} is not an AdaLoRA adapter (its config is {type(config).__name__})")
        self.adapter_name, self.config, self._model = name, config, model
        self.layers = adalora_adapters(model, name)
        self.init_budget = sum(adapter.rank for _, adapter in self.layers)  # b0
        self.target_budget = config.target_r * len(self.layers)  # bT
        # masks from a loaded rank_pattern (init_r long) that the current, shorter factors sit inside
        self._loaded_masks = {path: config.mask_for(path) for path, _ in self.layers}
        self.reset_importance()

    def reset_importance(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}  # Ī per (path, factor)
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}  # U per (path, factor)

    # ------------------------------------------------------------------ schedule
    def budget(self, step: int) -> tuple[int, bool]:
        """(b(step), whether this step re-allocates) — PEFT's ``budget_schedule``."""
        cfg = self.config
        if step <= cfg.tinit:
            return self.init_budget, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_budget, True
        progress = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_budget - self.target_budget) * progress**3 + self.target_budget)
        return budget, step % cfg.deltaT == 0

    # ------------------------------------------------------------------ importance
    @torch.no_grad()
    def update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for path, adapter in self.layers:
            for attr in ("lora_a", "lora_e", "lora_b"):
                p = getattr(adapter, attr)
                ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                key = (path, attr)
                avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
                unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                avg = b1 * avg + (1 - b1) * ipt  # sensitivity smoothing
                self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()  # uncertainty
                self.exp_avg_ipt[key] = avg

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i per layer path, shape (r,)."""
        scores = {}
        for path, adapter in self.layers:
            def s(attr: str, _path: str = path, _adapter: AdaLoraAdapter = adapter) -> torch.Tensor:
                key = (_path, attr)
                if key not in self.exp_avg_ipt:
                    return torch.zeros_like(getattr(_adapter, attr))
                return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

            score_a = s("lora_a").mean(dim=1)  # (r,)
            score_b = s("lora_b").mean(dim=0)  # (r,)
            scores[path] = s("lora_e").view(-1) + (score_a + score_b)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero Λ of the (b0 − budget) lowest-scored triplets over all layers; returns the rank_pattern."""
        scores = self.triplet_scores()
        cut = self.init_budget - budget
        if cut > 0:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=cut).values.item()
            for path, adapter in self.layers:
                adapter.apply_mask(scores[path] > threshold)
        return self.rank_pattern()

    def rank_pattern(self) -> dict[str, list[bool]]:
        """``adalora_mask_key(path)`` -> kept flags over the layer's initial rank (PEFT's config format)."""
        pattern = {}
        for path, adapter in self.layers:
            kept = adapter.kept.tolist()
            loaded = self._loaded_masks.get(path)
            if loaded is not None:  # spread the current flags over the True slots of the loaded mask
                it = iter(kept)
                kept = [next(it) if slot else False for slot in loaded]
            pattern[adalora_mask_key(path)] = kept
        return pattern

    # ------------------------------------------------------------------ the trainer's hook
    def step(self, model: torch.nn.Module, global_step: int) -> None:
        """PEFT's ``update_and_allocate``: call after ``optimizer.step()``, before ``zero_grad()``."""
        if self.config is None or model is not self._model:
            self._bind(model)
        cfg = self.config
        end = cfg.total_step - cfg.tfinal
        if global_step < end:
            self.update_importance()
            budget, reallocate = self.budget(global_step)
            if reallocate:
                cfg.rank_pattern = self.mask_to_budget(budget)
        elif global_step == end:
            cfg.rank_pattern = self.mask_to_budget(self.budget(global_step)[0])
            self.reset_importance()
        else:
            for _, adapter in self.layers:  # keep pruned triplets at zero through the final phase
                adapter.apply_mask(adapter.kept.clone())

    def extra_loss(self, model: torch.nn.Module) -> torch.Tensor:
        """The orthogonality penalty to add to the task loss."""
        return orthogonal_loss(model, self.adapter_name)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Importance EMAs and keep-masks (weights are checkpointed with the model), for resuming."""
        return {"exp_avg_ipt": {f"{p}|{a}": t.clone() for (p, a), t in self.exp_avg_ipt.items()},
                "exp_avg_unc": {f"{p}|{a}": t.clone() for (p, a), t in self.exp_avg_unc.items()},
                "kept": {path: adapter.kept.clone() for path, adapter in self.layers}}

    def load_state_dict(self, state: dict, model: torch.nn.Module | None = None) -> None:
        if model is not None and (self.config is None or model is not self._model):
            self._bind(model)
        if self.config is None:
            raise ConfigError("AdaLoraController.load_state_dict needs the model (pass model=...)")
        for name in ("exp_avg_ipt", "exp_avg_unc"):
            setattr(self, name, {tuple(k.split("|")): v.clone() for k, v in state[name].items()})
        for path, adapter in self.layers:
            adapter.apply_mask(state["kept"][path].to(adapter.kept.device))
        if any(not bool(adapter.kept.all()) for _, adapter in self.layers):
            self.config.rank_pattern = self.rank_pattern()

    def kept_ranks(self) -> dict[str, int]:
        return {path: int(adapter.kept.sum()) for path, adapter in self.layers}
