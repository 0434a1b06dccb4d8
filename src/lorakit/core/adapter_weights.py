"""One adapter as tensors: per target its kind, factors, extra tensors, rank, alpha and scaling rule.

    ΔW_target = scaling · B·A      scaling = α/r (LoRA) | α/√r (rsLoRA) | α/(ranknum + 1e-5) (AdaLoRA)

This module is the only place that knows

* the scaling rule (:func:`scaling`, :func:`apply_scaling`): the config, the live layers, the
  variants (DyLoRA at rank b, AdaLoRA's ranknum) and the analysis tools all call it;
* PEFT's key grammar (:func:`peft_key`, :func:`parse_peft_key` and the name constants): a key is
  ``base_model.model.`` + the module's path in PEFT's wrapped model + a suffix that depends on the
  layer kind and the tensor's role. The adapter name is never part of a saved key.

A live layer exports one :class:`TargetWeights` per adapter (``LoraLayer.export_adapter``) holding
its live tensors, so saving reads them and loading copies into them; :class:`AdapterWeights`
groups the targets of one adapter read from (or written to) a PEFT-format state dict, which is
what ``lorakit inspect / compress / combine`` work on and what a streaming merge asks for ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from lorakit.core.arithmetic import LoraFactors
from lorakit.errors import MergeError

# ---------------------------------------------------------------------------- the scaling rule
RULES = ("lora", "rslora", "adalora")
ADALORA_EPS = 1e-5  # PEFT's guard in AdaLoRA's scaling α / (ranknum + 1e-5)


def rule_for(use_rslora: bool = False, adalora: bool = False) -> str:
    """The scaling rule's name for a config's flags."""
    return "adalora" if adalora else ("rslora" if use_rslora else "lora")


def scaling(alpha: float, rank: Any, rule: str = "lora") -> Any:
    """The factor ΔW = scaling·B·A is multiplied by.

    Args:
        alpha: the layer's lora_alpha (alpha_pattern applied).
        rank: the rank the rule divides by: r for LoRA/rsLoRA, the current rank b for DyLoRA,
            ``ranknum`` (init_r, a number or a 1-element tensor) for AdaLoRA.
        rule: ``"lora"`` (α/r), ``"rslora"`` (α/√r) or ``"adalora"`` (α/(ranknum + 1e-5)).
    """
    if rule == "lora":
        return alpha / rank
    if rule == "rslora":
        return alpha / (rank.sqrt() if isinstance(rank, torch.Tensor) else math.sqrt(rank))
    if rule == "adalora":
        return alpha / (rank + ADALORA_EPS)
    raise ValueError(f"unknown scaling rule {rule!r}; known: {RULES}")


def apply_scaling(x: torch.Tensor, alpha: float, rank: Any, rule: str = "lora") -> torch.Tensor:
    """``x`` scaled by the rule, in PEFT's order of operations (bit-identical outputs).

    AdaLoRA multiplies by α first and divides by ``ranknum + 1e-5`` after; the others multiply by
    the precomputed factor once.
    """
    if rule == "adalora":
        return x * alpha / (rank + ADALORA_EPS)
    return x * scaling(alpha, rank, rule)


# ---------------------------------------------------------------------------- PEFT's key grammar
PREFIX = "base_model.model."
BASE_LAYER = "base_layer"  # PEFT's name for a wrapper's inner module (lorakit: ``base``)
BASE_BIAS = f"{BASE_LAYER}.bias"  # a wrapped layer's bias, saved with bias="lora_only"/"all"
TOKEN_ADAPTER = "token_adapter"  # PEFT's TrainableTokens wrapper
TOKENS_SUFFIX = f"{TOKEN_ADAPTER}.trainable_tokens_delta"
TOKENS_BASE = f"{TOKEN_ADAPTER}.{BASE_LAYER}"
MODULES_TO_SAVE = "modules_to_save"  # PEFT's ModulesToSaveWrapper: the trained copies ...
ORIGINAL_MODULE = "original_module"  # ... and the frozen original
ADALORA_MASK = "lora_E"  # AdaLoRA's rank_pattern keys are ``<module>.lora_E``

KINDS = ("linear", "embedding", "conv", "param", "mha")
# role -> suffix; a role is lorakit's name for a tensor, the suffix PEFT's
_PLAIN = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}
_SUFFIXES: dict[str, dict[str, str]] = {
    "linear": _PLAIN,
    "conv": _PLAIN,
    "param": _PLAIN,
    "embedding": {"lora_a": "lora_embedding_A", "lora_b": "lora_embedding_B"},
    "mha": {**_PLAIN, "out_a": f"{BASE_LAYER}.out_proj.lora_A.weight",
            "out_b": f"{BASE_LAYER}.out_proj.lora_B.weight"},
}
_ADALORA = {"lora_a": "lora_A", "lora_e": ADALORA_MASK, "lora_b": "lora_B"}
_EXTRA = {"magnitude": "lora_magnitude_vector", "lora_b_bias": "lora_B.bias"}
# every suffix, longest first, so a parse never stops at a shorter one that ends the same way
_ALL_SUFFIXES = sorted({(s, r) for table in (*_SUFFIXES.values(), _ADALORA, _EXTRA) for r, s in table.items()},
                       key=lambda sr: -len(sr[0]))


def suffix(kind: str, role: str, rule: str = "lora") -> str:
    """PEFT's suffix for tensor `role` of a target of `kind` (AdaLoRA has its own names)."""
    if rule == "adalora" and role in _ADALORA:
        return _ADALORA[role]
    table = _SUFFIXES.get(kind)
    if table is None:
        raise ValueError(f"unknown target kind {kind!r}; known: {KINDS}")
    if role in table:
        return table[role]
    if role in _EXTRA:
        return _EXTRA[role]
    raise ValueError(f"a {kind} target has no tensor role {role!r}")


def join_key(path: str, tail: str) -> str:
    """``base_model.model.<path>.<tail>`` (the root module's tensors have no path)."""
    return f"{PREFIX}{path}.{tail}" if path else f"{PREFIX}{tail}"


def peft_key(path: str, kind: str, role: str, rule: str = "lora") -> str:
    """The full PEFT key of one adapter tensor; `path` is spelled as in PEFT's wrapped model."""
    return join_key(path, suffix(kind, role, rule))


def normalise_key(key: str) -> str:
    """PEFT files always carry the ``base_model.model.`` prefix; accept keys without it."""
    return key if key.startswith(PREFIX) else PREFIX + key


def parse_peft_key(key: str) -> tuple[str, str, str] | None:
    """(path, role, suffix) of an adapter-tensor key, or None for other tensors (modules_to_save, ...).

    The prefix is optional; the adapter name is never in a saved key. ``lora_A`` without ``.weight``
    is AdaLoRA's spelling.
    """
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for tail, role in _ALL_SUFFIXES:
        if key.endswith("." + tail):
            return key[: -len(tail) - 1], role, tail
    return None


def adalora_mask_key(path: str) -> str:
    """The rank_pattern key under which AdaLoRA saves the keep-mask of module `path`."""
    return f"{path}.{ADALORA_MASK}"


def is_adalora_mask_key(key: str, path: str) -> bool:
    """Whether rank_pattern key `key` holds the mask of `path` (PEFT may append the adapter name)."""
    head = adalora_mask_key(path)
    return key == head or (key.startswith(head + ".") and "." not in key[len(head) + 1:])


# ---------------------------------------------------------------------------- one target
@dataclass
class TargetWeights:
    """One adapted target (module or raw parameter) as tensors, in PEFT's on-disk layout.

    Args:
        path: the module (or raw parameter) path in PEFT's wrapped model, without the prefix.
        kind: ``"linear"`` (also GPT-2's Conv1D with `fan_in_fan_out`), ``"embedding"``,
            ``"conv"`` (Conv1d/2d/3d, `groups`), ``"param"`` (a raw 2-D weight) or ``"mha"``.
        lora_a: A, (r, in) / (r, in, *kernel) / (r, num_embeddings); AdaLoRA conv: (r, in·k).
        lora_b: B, (out, r) / (out, r/groups, 1, ...) / (dim, r).
        alpha: the target's lora_alpha (alpha_pattern applied).
        rule: the scaling rule, see :func:`scaling`.
        extra: role -> tensor for what else the variant stores: ``magnitude`` (DoRA),
            ``lora_b_bias`` (lora_bias), ``lora_e`` (AdaLoRA's Λ, (r, 1)), ``out_a``/``out_b``
            (MultiheadAttention's out_proj pair).
        fan_in_fan_out: the base weight is stored (in, out) (GPT-2's Conv1D).
        groups: a conv's groups (B is a grouped 1×1 conv).
        scale_rank: the rank the rule divides by when it is not A's row count (AdaLoRA's
            ranknum = init_r; DyLoRA's active rank).
    """

    path: str
    kind: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    alpha: float
    rule: str = "lora"
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    groups: int = 1
    scale_rank: float | torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def use_rslora(self) -> bool:
        return self.rule == "rslora"

    @property
    def scaling(self) -> float:
        return float(scaling(self.alpha, self.scale_rank if self.scale_rank is not None else self.rank, self.rule))

    def scaling_at(self, rank: int) -> float:
        """The scaling this target would have at another rank (same alpha and rule)."""
        return float(scaling(self.alpha, rank, self.rule))

    # 2-D views, for arithmetic on the thin factors
    @property
    def factors(self) -> LoraFactors:
        """(A as (r, k), B as (d, r), scaling); a conv kernel is flattened to k = in·kh·kw."""
        return LoraFactors(self.lora_a.reshape(self.rank, -1), self.lora_b.reshape(self.lora_b.shape[0], -1),
                           self.scaling)

    @property
    def in_features(self) -> int:
        return int(self.lora_a[0].numel())

    @property
    def out_features(self) -> int:
        return int(self.lora_b.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(d, k) of ΔW = scaling·B·A as a matrix."""
        return (self.out_features, self.in_features)

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in (self.lora_a, self.lora_b, *self.extra.values()))

    def with_factors(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> TargetWeights:
        """The same target with new 2-D factors (any rank), put back into this kind's layout."""
        rank = int(lora_a.shape[0])
        a = lora_a.reshape(rank, *self.lora_a.shape[1:])
        b = lora_b.reshape(lora_b.shape[0], rank, *self.lora_b.shape[2:]) if self.lora_b.dim() > 2 else lora_b
        return replace(self, lora_a=a, lora_b=b, extra=dict(self.extra))

    # keys
    def roles(self) -> dict[str, torch.Tensor]:
        """role -> tensor, the factors first."""
        return {"lora_a": self.lora_a, "lora_b": self.lora_b, **self.extra}

    def peft_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """PEFT key -> tensor; the tensors themselves (live ones stay live) unless `dtype` casts them."""
        return {peft_key(self.path, self.kind, role, self.rule): t if dtype is None else t.to(dtype)
                for role, t in self.roles().items()}

    # ΔW
    @torch.no_grad()
    def delta(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW in the base weight's layout, fp32: what a merge adds to that weight.

        Args:
            base_weight: the (dense, dequantised) base weight. Needed for DoRA, whose ΔW depends
                on it, and for an AdaLoRA conv (to restore the kernel's shape); ignored otherwise.

        Linear: (out, in), or (in, out) with fan_in_fan_out; Embedding: (num_embeddings, dim);
        Conv: (out, in, *kernel); param: the parameter's shape; MultiheadAttention: the in_proj
        delta (3E, E) (see :meth:`out_proj_delta`). The bias part of ``lora_bias`` is
        :meth:`bias_delta`. A grouped conv has no dense delta (MergeError, as PEFT).
        """
        a, b = self.lora_a.float(), self.lora_b.float()
        if self.rule == "adalora":
            a = a * self.extra["lora_e"].float()
        if self.kind == "conv" and a.dim() > 2:
            if self.groups > 1:
                raise MergeError(f"{self.path}: a LoRA adapter on a grouped convolution (groups={self.groups}) has "
                                 "no dense weight delta (PEFT refuses to merge it too)")
            product = torch.einsum("or,r...->o...", b.flatten(1), a)  # (out, in, *k)
        else:
            product = b.reshape(b.shape[0], -1) @ a  # (out, in) / (out, in·k)
            if base_weight is not None and base_weight.dim() > 2:
                product = product.reshape(base_weight.shape)  # AdaLoRA's flat conv factors
        rank = self.scale_rank if self.scale_rank is not None else self.rank
        lora = apply_scaling(product, self.alpha, rank, self.rule)
        if self.kind == "embedding" or self.fan_in_fan_out:
            lora = lora.T
        if "magnitude" not in self.extra:
            return lora
        if base_weight is None:
            raise ValueError(f"{self.path}: DoRA's ΔW depends on the base weight; pass base_weight")
        weight = base_weight.float()
        axis = 1 if self.kind == "embedding" or self.fan_in_fan_out else 0  # the axis of output units
        merged = weight + lora
        norm = merged.norm(p=2, dim=tuple(d for d in range(merged.dim()) if d != axis), keepdim=True)
        return self.extra["magnitude"].float().reshape(norm.shape) / norm * merged - weight

    @torch.no_grad()
    def out_proj_delta(self) -> torch.Tensor:
        """MultiheadAttention only: what PEFT ≤ 0.21 adds to out_proj.weight, twice s·B_o·A_o (fp32)."""
        if self.kind != "mha":
            raise ValueError(f"{self.path} is a {self.kind} target; only MultiheadAttention has an out_proj delta")
        return 2 * apply_scaling(self.extra["out_b"].float() @ self.extra["out_a"].float(), self.alpha,
                                 self.rank, self.rule)

    @torch.no_grad()
    def bias_delta(self) -> torch.Tensor | None:
        """lora_bias only: what a merge adds to the base bias (scaling·b), fp32; else None."""
        bias = self.extra.get("lora_b_bias")
        return None if bias is None else apply_scaling(bias.float(), self.alpha, self.rank, self.rule)


# ---------------------------------------------------------------------------- one adapter
@dataclass
class AdapterWeights:
    """One adapter's tensors: its targets plus the tensors that are not low-rank factors.

    Args:
        targets: PEFT path -> :class:`TargetWeights`, sorted by path.
        other: PEFT key -> tensor for everything else in the file: modules_to_save copies,
            trainable tokens (``<embedding>.token_adapter.trainable_tokens_delta``), base biases.
        config: the adapter_config.json it came with (or will be written with), unchanged.
        source: the folder it was read from, if any.
    """

    targets: dict[str, TargetWeights]
    other: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    @property
    def num_params(self) -> int:
        return sum(t.num_params for t in self.targets.values())

    @property
    def dtype(self) -> torch.dtype:
        """The most common dtype of the factors (what a written copy is stored in)."""
        counts: dict[torch.dtype, int] = {}
        for t in self.targets.values():
            counts[t.lora_a.dtype] = counts.get(t.lora_a.dtype, 0) + 1
        return max(counts, key=lambda d: counts[d]) if counts else torch.float32

    def peft_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """PEFT key -> tensor, ready for ``adapter_model.safetensors`` (factors cast to `dtype` if given)."""
        out = dict(self.other)
        for target in self.targets.values():
            out.update(target.peft_tensors(dtype))
        return out

    @classmethod
    def from_peft_state_dict(cls, tensors: Mapping[str, torch.Tensor], config: Any,
                             raw_config: Mapping[str, Any] | None = None,
                             on_target: Callable[[str, dict[str, torch.Tensor]], None] | None = None,
                             source: Path | None = None) -> AdapterWeights:
        """Group a PEFT state dict into targets.

        Args:
            tensors: PEFT key -> tensor (prefix optional).
            config: a LoraConfig-like object: ``rank_for``/``alpha_for``/``use_rslora``/``fan_in_fan_out``
                (and ``init_r`` for AdaLoRA) give each target's alpha and rule.
            raw_config: the adapter_config.json as read, kept on the result.
            on_target: called with (path, role -> tensor) before each target is built, to refuse
                what a caller can't handle (it raises).
            source: where the tensors were read from, kept on the result.

        Other keys (modules_to_save copies, trainable tokens, biases) go to ``other`` as given.
        """
        adalora = str(getattr(config, "peft_type", "LORA")).upper() == "ADALORA"
        rule = rule_for(bool(getattr(config, "use_rslora", False)), adalora)
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        suffixes: dict[str, set[str]] = {}
        other: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            parsed = parse_peft_key(key)
            if parsed is None:
                other[key] = tensor
                continue
            path, role, tail = parsed
            grouped.setdefault(path, {})[role] = tensor
            suffixes.setdefault(path, set()).add(tail)
        targets = {}
        for path in sorted(grouped):
            roles = grouped[path]
            if on_target is not None:
                on_target(path, roles)
            if "lora_a" not in roles or "lora_b" not in roles:
                raise ValueError(f"layer {path} has no {'lora_B' if 'lora_a' in roles else 'lora_A'} tensor; "
                                 "the adapter is incomplete")
            tails = suffixes[path]
            a = roles.pop("lora_a")
            b = roles.pop("lora_b")
            if suffix("embedding", "lora_a") in tails:
                kind = "embedding"
            elif "out_a" in roles:
                kind = "mha"
            elif a.dim() > 2:  # AdaLoRA's conv factors are flat: "linear" here, reshaped by delta(base_weight)
                kind = "conv"
            else:
                kind = "linear"
            groups = int(a.shape[0] // b.shape[1]) if kind == "conv" and b.dim() > 2 and b.shape[1] else 1
            targets[path] = TargetWeights(
                path=path, kind=kind, lora_a=a, lora_b=b, alpha=float(config.alpha_for(path)), rule=rule,
                extra=roles, fan_in_fan_out=bool(getattr(config, "fan_in_fan_out", False)) and kind == "linear",
                groups=groups,
                # a (1,) fp32 tensor like PEFT's ranknum, so ΔW rounds as the live layer's does
                scale_rank=torch.full((1,), float(config.init_r)) if adalora else None)
        return cls(targets=targets, other=other, config=dict(raw_config or {}), source=source)
