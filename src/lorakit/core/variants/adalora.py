"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget is re-allocated while training.

    ΔW = s · P·(Λ ⊙ Q)       P = B (out, r), Λ = E (r, 1), Q = A (r, in)

exactly as PEFT computes it, s being AdaLoRA's rule in ``adapter_weights.scaling``: α divided by
``ranknum`` (the layer's initial rank ``init_r``, plus PEFT's 1e-5 guard); pruned triplets
have Λ = 0). Training adds the orthogonality penalty :func:`orthogonal_loss` to the loss and calls
:class:`~lorakit.core.variants.adalora_budget.AdaLoraController` after each optimizer step; it masks
the least important triplets on a cubic budget schedule and records ``rank_pattern``.

File format = PEFT's (key names in ``lorakit.core.adapter_weights``): A (r × in), E (r × 1) and
B (out × r), pruned triplets dropped; ``rank_pattern`` in the config maps each module's E key
(``adalora_mask_key``) to a list of ``init_r`` booleans (True = kept), so the file's rank per
layer is the number of True entries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lorakit.core.adapter_weights import apply_scaling, is_adalora_mask_key
from lorakit.core.config import LoraConfig
from lorakit.core.layers import LoraAdapter, LoraLayer, LoraLinear
from lorakit.errors import ConfigError, TargetModuleError


@dataclass
class AdaLoraConfig(LoraConfig):
    """PEFT's AdaLoraConfig fields. ``r`` is ignored: every layer starts at ``init_r``."""

    init_r: int = 12  # rank each layer starts with
    target_r: int = 8  # average rank per layer once the budget schedule ends
    tinit: int = 0  # warm-up steps at the full budget before any pruning
    tfinal: int = 0  # last steps at the final budget (masks frozen, importance no longer tracked)
    deltaT: int = 1  # re-allocate the budget every deltaT steps during the schedule
    beta1: float = 0.85  # EMA factor of the sensitivity |w·∇w|
    beta2: float = 0.85  # EMA factor of its uncertainty |I − Ī|
    orth_reg_weight: float = 0.5  # weight of the orthogonality penalty on P and Q
    total_step: int | None = None  # training steps in total (the schedule needs it)
    rank_pattern: dict[str, Any] = field(default_factory=dict)  # adalora_mask_key(module) -> init_r booleans
    peft_type: str = "ADALORA"

    def __post_init__(self) -> None:
        if self.rank_pattern is None:
            self.rank_pattern = {}
        super().__post_init__()

    def validate(self) -> None:
        pattern, self.rank_pattern = self.rank_pattern, {}  # the base class wants int ranks there
        try:
            super().validate()
        finally:
            self.rank_pattern = pattern
        for name in ("init_r", "target_r", "deltaT"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be ≥ 0, got {self.orth_reg_weight!r}")
        if not isinstance(self.total_step, int) or self.total_step <= 0:
            raise ConfigError("AdaLoRA needs total_step > 0: the budget schedule is a function of the total steps")
        if min(self.tinit, self.tfinal) < 0 or self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leave no "
                              "budgeting phase: need 0 ≤ tinit < total_step − tfinal")
        if self.use_dora or self.use_dylora or self.shared_a_with:
            raise ConfigError("AdaLoRA can't be combined with use_dora, use_dylora or shared_a_with")
        if self.init_lora_weights not in (True, False):
            raise ConfigError(f"AdaLoRA supports init_lora_weights True/False only, got {self.init_lora_weights!r}")
        for key, mask in self.rank_pattern.items():
            if not isinstance(mask, list) or not all(isinstance(v, bool) for v in mask):
                raise ConfigError(f"AdaLoRA rank_pattern[{key!r}] must be a list of booleans (kept triplets)")

    @classmethod
    def peft_type_expected(cls) -> str:
        return "ADALORA"

    def mask_for(self, module_name: str) -> list[bool] | None:
        """The saved keep-mask of this module (under its ``adalora_mask_key``), if any."""
        for key, mask in self.rank_pattern.items():
            if is_adalora_mask_key(key, module_name):
                return mask
        return None

    def rank_for(self, module_name: str) -> int:
        mask = self.mask_for(module_name)
        return self.init_r if mask is None else sum(mask)

    def scaling_rule(self) -> str:
        return "adalora"

    def scale_rank_for(self, module_name: str) -> float:
        return self.init_r  # AdaLoRA divides by the initial rank however many triplets are kept

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["rank_pattern"] = dict(self.rank_pattern) or None  # PEFT writes null when nothing was pruned
        return out

    def replace(self, **changes: Any) -> AdaLoraConfig:
        return dataclasses.replace(self, **changes)


class AdaLoraAdapter(LoraAdapter):
    """SVD-form adapter: lora_a = Q (r, in), lora_e = Λ (r, 1), lora_b = P (out, r)."""

    custom_math = True

    def setup(self, layer: LoraLayer, config: AdaLoraConfig) -> None:
        if not isinstance(layer, LoraLinear):
            raise TargetModuleError(f"AdaLoRA supports Linear-like and Conv2d layers only, not "
                                    f"{type(layer.base).__name__}; exclude it from target_modules")
        self.init_svd_factors(config)

    def init_svd_factors(self, config: AdaLoraConfig) -> None:
        """Create Λ, the rank buffers, and PEFT's init of P, Λ, Q."""
        placement = {"device": self.lora_a.device, "dtype": self.lora_a.dtype}
        self.lora_e = nn.Parameter(torch.zeros(self.rank, 1, **placement))
        with torch.no_grad():
            if config.init_lora_weights:  # PEFT: Λ = 0 (ΔW = 0), P and Q ~ N(0, 0.02²)
                nn.init.normal_(self.lora_a, mean=0.0, std=0.02)
                nn.init.normal_(self.lora_b, mean=0.0, std=0.02)
            else:  # everything random: a non-zero ΔW, for tests
                for p in (self.lora_a, self.lora_e, self.lora_b):
                    p.normal_()
        # a (1,) fp32 tensor like PEFT's ranknum parameter, so the arithmetic is the same
        self.register_buffer("ranknum", torch.full((1,), float(config.init_r), device=placement["device"]),
                             persistent=False)
        self.register_buffer("kept", torch.ones(self.rank, dtype=torch.bool, device=placement["device"]),
                             persistent=False)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, kept={int(self.kept.sum())}, alpha={self.alpha}, adalora=True"

    # saved tensors: pruned triplets dropped (views of the parameters when nothing is pruned, so
    # that loading can copy into them)
    @property
    def saved_a(self) -> torch.Tensor:
        return self.lora_a if bool(self.kept.all()) else self.lora_a[self.kept]

    @property
    def saved_e(self) -> torch.Tensor:
        return self.lora_e if bool(self.kept.all()) else self.lora_e[self.kept]

    @property
    def saved_b(self) -> torch.Tensor:
        return self.lora_b if bool(self.kept.all()) else self.lora_b[:, self.kept]

    def tensor_roles(self) -> dict[str, str]:
        return {"lora_a": "saved_a", "lora_e": "saved_e", "lora_b": "saved_b"}

    def scaling_rank(self) -> torch.Tensor:
        return self.ranknum

    def delta(self, layer: LoraLayer) -> torch.Tensor:
        """ΔW = s · B·(A ⊙ E) (AdaLoRA's scaling rule), fp32, in the base weight's layout."""
        product = layer.delta_from((self.lora_a * self.lora_e).float(), self.lora_b.float())
        return apply_scaling(product, self.alpha, self.ranknum, "adalora")

    def output(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        x = layer.cast_input(x, self.lora_a.dtype)
        u = layer.project_a(self.dropout(x), self.lora_a * self.lora_e)  # (..., r)
        y = apply_scaling(layer.project_b(u, self.lora_b), self.alpha, self.ranknum, "adalora")  # (..., out)
        return (result + y).to(result.dtype)  # PEFT's in-place `result +=`: summed in fp32, rounded once

    @torch.no_grad()
    def apply_mask(self, kept: torch.Tensor) -> None:
        """Keep only the triplets where `kept` is True (Λ = 0 elsewhere)."""
        self.kept.copy_(kept)
        self.lora_e.masked_fill_(~kept.view(-1, 1), 0.0)


def adalora_adapters(model: torch.nn.Module, adapter_name: str) -> list[tuple[str, AdaLoraAdapter]]:
    """(module path, adapter) of every AdaLoRA adapter named `adapter_name`, in module order."""
    found = []
    for path, module in getattr(model, "model", model).named_modules():
        adapters = module.adapters if isinstance(module, LoraLayer) else {}
        if adapter_name in adapters and isinstance(adapters[adapter_name], AdaLoraAdapter):
            found.append((path, module.adapters[adapter_name]))
    return found


def trainable_adalora_name(model: torch.nn.Module) -> str | None:
    """The one AdaLoRA adapter being trained (active, not inference_mode), or None."""
    configs = getattr(model, "peft_config", {})
    names = [n for n in getattr(model, "active_adapters", []) if isinstance(configs.get(n), AdaLoraConfig)
             and not configs[n].inference_mode]
    if len(names) > 1:
        raise ConfigError(f"AdaLoRA trains one adapter at a time; active trainable AdaLoRA adapters: {names}")
    return names[0] if names else None


def orthogonal_loss(model: torch.nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """w · mean over P, Q of ‖QQᵀ − I‖_F, ‖PᵀP − I‖_F (PEFT's form: Frobenius norm, not squared).

    Add it to the task loss before ``backward()``; 0 when the model has no trainable AdaLoRA adapter.
    """
    name = adapter_name or trainable_adalora_name(model)
    layers = adalora_adapters(model, name) if name else []
    if not layers:
        return torch.zeros(())
    terms = []
    for _, adapter in layers:
        for cov in (adapter.lora_a @ adapter.lora_a.T, adapter.lora_b.T @ adapter.lora_b):  # (r, r) each
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
    return model.peft_config[name].orth_reg_weight * (torch.stack(terms).sum() / len(terms))
