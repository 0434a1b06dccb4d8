"""LoRA configuration: PEFT's field names, validated at construction, JSON round-trip.

A PEFT ``adapter_config.json`` loads as is (unknown keys are warned about and kept aside), and
``to_dict()`` writes the keys PEFT expects, so our adapters load in PEFT.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from lorakit.core.adapter_weights import rule_for, scaling
from lorakit.core.peft_features import check_peft_features
from lorakit.errors import ConfigError, ConfigKeyError, did_you_mean

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
# init_lora_weights values lorakit implements: True/"kaiming" (A Kaiming-uniform, B = 0), False (both
# random: ΔW ≠ 0, for tests), "gaussian" (A ~ N(0, 1/r)), "pissa"/"pissa_niter_K" and "olora" (factors from
# the base weight, which becomes the residual), "orthogonal" (orthogonal A and B, ΔW = 0). PEFT's other
# values (loftq, eva, corda, lora_ga, ...) are refused by name in peft_features before this list is checked.
_INIT_MODES = (True, False, "gaussian", "kaiming", "pissa", "olora", "orthogonal")


class _KnownKeywords(type):
    """Metaclass: an unknown keyword is a ConfigKeyError naming the closest field, not a bare TypeError.

    Checked in ``__call__`` so every dataclass subclass (the variants' configs) gets it without
    overriding its generated ``__init__``.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        check_peft_features(kwargs)  # a PEFT-only feature is refused by name before "unknown keyword"
        fields = [f.name for f in dataclasses.fields(cls) if f.init] if dataclasses.is_dataclass(cls) else []
        unknown = [k for k in kwargs if k not in fields]
        if fields and unknown:
            raise ConfigKeyError(
                f"{cls.__name__} got an unknown keyword {unknown[0]!r}{did_you_mean(unknown[0], fields)}; "
                f"its fields are: {', '.join(f for f in fields if f != 'extra')}")
        return super().__call__(*args, **kwargs)


@dataclass
class LoraConfig(metaclass=_KnownKeywords):
    r: int = 8  # rank of the update ΔW = B·A; trainable params per Linear = r·(in + out)
    lora_alpha: float = 8  # ΔW is scaled by lora_alpha / r (or / √r with use_rslora)
    lora_dropout: float = 0.0  # dropout on the LoRA path's input only; the base path never sees it
    target_modules: list[str] | str | None = None  # name suffixes, a full-match regex, or "all-linear"
    exclude_modules: list[str] | str | None = None  # same syntax; wins over target_modules
    target_parameters: list[str] | None = None  # raw weights such as "rnn.weight_ih_l0" (LSTM/GRU)
    bias: str = "none"  # which biases train: none, all, lora_only (those of LoRA-wrapped layers)
    modules_to_save: list[str] | None = None  # modules trained in full and saved, e.g. a classifier head
    fan_in_fan_out: bool = False  # the base stores weight as (in, out): GPT-2's Conv1D
    init_lora_weights: bool | str = True  # see _INIT_MODES: True/"kaiming", False, "gaussian", "pissa[_niter_K]", ...
    use_rslora: bool = False  # rank-stabilised scaling α/√r
    use_dora: bool = False  # weight-decomposed LoRA (see lorakit.core.variants)
    lora_bias: bool = False  # B gets a trainable bias (PEFT's lora_bias); merging adds it to the base bias
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None  # embedding rows trained in full
    # lorakit-only (written to adapter_config.json only when set; PEFT ignores them):
    use_dylora: bool = False  # DyLoRA: train nested ranks b ≤ r (scaling α/b), usable at any rank after
    shared_a_with: str | None = None  # reuse that adapter's A on every layer; this adapter trains its own B
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex on module name -> r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # regex on module name -> alpha
    layers_to_transform: list[int] | int | None = None  # only these layer indices
    layers_pattern: list[str] | str | None = None  # the name before the layer index, e.g. "layers"
    task_type: str | None = None  # PEFT's task type (CAUSAL_LM, SEQ_CLS, ...), kept for interop
    base_model_name_or_path: str | None = None
    inference_mode: bool = False  # loaded frozen (PEFT's flag); training flips it off
    revision: str | None = None
    peft_type: str = "LORA"
    # keys read from a file that we don't know; kept so a round-trip loses nothing
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer (the LoRA rank), got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        pissa_niter = isinstance(self.init_lora_weights, str) and re.fullmatch(r"pissa_niter_\d+", self.init_lora_weights)
        if self.init_lora_weights not in _INIT_MODES and not pissa_niter:
            raise ConfigError(f"init_lora_weights must be one of {_INIT_MODES} or 'pissa_niter_<K>', "
                              f"got {self.init_lora_weights!r}")
        check_peft_features({"init_lora_weights": self.init_lora_weights})
        if self.target_modules is None and not self.target_parameters:
            raise ConfigError(
                "target_modules is required: a list of module-name suffixes (e.g. ['q_proj', 'v_proj']), "
                "a regex string, or 'all-linear'"
            )
        from lorakit.io.config_validation import check_config_fields

        check_config_fields(self)  # every field's type and range, naming the key
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            _check_regex("target_modules", self.target_modules)
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in pattern.items():
                _check_regex(f"{name} key", key)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ConfigError(f"{name}[{key!r}] must be a positive number, got {value!r}")
                if name == "rank_pattern" and int(value) != value:
                    raise ConfigError(f"rank_pattern[{key!r}] must be an integer rank, got {value!r}")
        if self.use_dora and self.use_rslora is None:
            raise ConfigError("use_rslora must be a bool")
        if self.shared_a_with is not None and not isinstance(self.shared_a_with, str):
            raise ConfigError(f"shared_a_with must be an adapter name (str), got {self.shared_a_with!r}")
        chosen = [n for n in ("use_dora", "use_dylora", "shared_a_with") if getattr(self, n)]
        if len(chosen) > 1:
            raise ConfigError(f"{' and '.join(chosen)} can't be combined; pick one variant per adapter")
        self._validate_peft_extras(chosen)

    def _validate_peft_extras(self, variants: list[str]) -> None:
        """lora_bias, trainable tokens, target_parameters: PEFT's own restrictions, as ConfigErrors."""
        if not isinstance(self.lora_bias, bool):
            raise ConfigError(f"lora_bias must be true or false, got {self.lora_bias!r}")
        init = self.init_lora_weights
        if self.lora_bias and self.peft_type_expected() != "LORA":
            variants = [*variants, f"peft_type={self.peft_type_expected()!r}"]
        if self.lora_bias and (init not in (True, False) or variants):
            what = f"init_lora_weights={init!r}" if init not in (True, False) else variants[0]
            raise ConfigError(f"lora_bias=True works only with plain LoRA and init_lora_weights=True/False "
                              f"(as in PEFT), not with {what}; drop one of them")
        tokens = self.trainable_token_indices
        if tokens is not None:
            lists = tokens.values() if isinstance(tokens, dict) else [tokens]
            if not all(isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                            for i in v) for v in lists):
                raise ConfigError("trainable_token_indices must be a list of token ids, or a dict "
                                  f"{{embedding module name: [token ids]}}, got {tokens!r}")
            if any(len(set(v)) != len(v) for v in lists):  # index_copy with a repeated row is undefined
                raise ConfigError(f"trainable_token_indices lists a token id twice: {tokens!r}; list each id once")
        if self.target_parameters:
            special_init = isinstance(init, str) and init not in ("gaussian", "kaiming")
            blocked = [*variants, *(["lora_bias"] if self.lora_bias else []),
                       *([f"peft_type={self.peft_type_expected()!r}"] if self.peft_type_expected() != "LORA" else []),
                       *([f"init_lora_weights={init!r}"] if special_init else []),
                       *([f"lora_dropout={self.lora_dropout}"] if self.lora_dropout else [])]
            if blocked:
                raise ConfigError(f"target_parameters (LoRA on raw weights) can't be combined with {blocked[0]}: "
                                  "it would act on those weights as plain LoRA (PEFT refuses it too). Use a "
                                  "separate adapter for the raw parameters, or target their modules instead")

    # ------------------------------------------------------------------ per-module values
    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scaling_rule(self) -> str:
        """The name of this config's scaling rule (see ``lorakit.core.adapter_weights.scaling``)."""
        return rule_for(bool(self.use_rslora))

    def scale_rank_for(self, module_name: str) -> float:
        """The rank the scaling rule divides by for this module (AdaLoRA: its init_r)."""
        return self.rank_for(module_name)

    def scaling_for(self, module_name: str) -> float:
        """This module's scaling (α/r, or α/√r with rsLoRA), rank and alpha patterns applied."""
        return float(scaling(self.alpha_for(module_name), self.scale_rank_for(module_name), self.scaling_rule()))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for name in _LORAKIT_ONLY:  # keep plain adapters free of keys PEFT would warn about
            if not out.get(name):
                out.pop(name, None)
        out = {**self.extra, **out}
        out["peft_type"] = self.peft_type
        if out.get("init_lora_weights") == "kaiming":  # lorakit's alias; PEFT knows it as True
            out["init_lora_weights"] = True
        if isinstance(out["target_modules"], list):
            out["target_modules"] = sorted(out["target_modules"])
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        check_peft_features(data)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        peft_type = str(kwargs.get("peft_type", "LORA")).upper()
        if peft_type != cls.peft_type_expected():
            raise ConfigError(f"adapter config has peft_type {peft_type!r}; {cls.__name__} reads 'LORA'")
        if isinstance(kwargs.get("target_modules"), list | set | tuple):
            kwargs["target_modules"] = sorted(kwargs["target_modules"])
        return cls(**kwargs, extra=extra)

    @classmethod
    def peft_type_expected(cls) -> str:
        return "LORA"

    def replace(self, **changes: Any) -> LoraConfig:
        return dataclasses.replace(self, **changes)


_LORAKIT_ONLY = ("use_dylora", "shared_a_with")

def _check_regex(what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None


def _pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    """PEFT's rule: the first key whose regex matches the end of the name at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
