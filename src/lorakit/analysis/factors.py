"""PEFT-format adapter folders read as :class:`~lorakit.core.adapter_weights.AdapterWeights`, and back.

    ΔW_layer = scaling · B·A      (the scaling rule and the key grammar live in core/adapter_weights.py)

The analysis tools (inspect, compress, combine) work on the factors of plain LoRA adapters:
Linear, Embedding (ΔW here is the transpose of the embedding's weight layout; norms and spectra
don't change) and Conv (A (r, in, kh, kw) seen as (r, in·kh·kw), B (out, r, 1, 1) as (out, r)).
Variants whose ΔW is not scaling·B·A are refused by name. Rank and alpha per layer follow PEFT:
``rank_pattern`` / ``alpha_pattern`` keys are regexes matched at the end of the module name on a
dot boundary, first match wins.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lorakit.analysis.errors import CorruptAdapterError, NotAnAdapterError, UnsupportedAdapterError
from lorakit.core.adapter_weights import AdapterWeights, TargetWeights
from lorakit.core.config import LoraConfig
from lorakit.errors import AdapterLoadError, ConfigError
from lorakit.io import CONFIG_NAME, read_adapter_folder, write_adapter_folder

# tensor roles whose presence means ΔW is not scaling·B·A
_UNSUPPORTED = {
    "magnitude": "DoRA (use_dora)",
    "lora_b_bias": "lora_bias",
    "lora_e": "AdaLoRA",
    "out_a": "LoRA on nn.MultiheadAttention (PEFT adds the out_proj delta twice)",
    "out_b": "LoRA on nn.MultiheadAttention (PEFT adds the out_proj delta twice)",
}


def read_adapter(path: str | os.PathLike) -> AdapterWeights:
    """Read a PEFT-format LoRA adapter folder (safetensors, or legacy .bin without unpickling).

    Args:
        path: the folder (adapter_config.json + adapter_model.safetensors).

    Raises NotAnAdapterError, CorruptAdapterError, or UnsupportedAdapterError for adapters whose
    ΔW is not scaling·B·A (DoRA, lora_bias, AdaLoRA, MultiheadAttention, grouped convs).
    """
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        subdirs = sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file()) if path.is_dir() else []
        hint = f"; it has adapter subfolders: {', '.join(subdirs)}" if subdirs else ""
        what = "is not a folder" if not path.is_dir() else f"has no {CONFIG_NAME}"
        raise NotAnAdapterError(f"{path} is not an adapter folder: it {what}{hint}")
    try:
        raw_config, tensors = read_adapter_folder(path)
    except AdapterLoadError as exc:
        raise CorruptAdapterError(str(exc)) from None
    peft_type = str(raw_config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(f"{path} is a {peft_type} adapter; the analysis tools read LoRA adapters only")
    if raw_config.get("use_dora"):
        raise UnsupportedAdapterError(f"{path} is a DoRA adapter (use_dora); its ΔW is not scaling·B·A")
    if raw_config.get("lora_bias"):
        raise UnsupportedAdapterError(f"{path} uses lora_bias; its ΔW is not scaling·B·A alone")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown PEFT keys: the core warns when it loads them
            config = LoraConfig.from_dict(raw_config)
    except (ConfigError, TypeError) as exc:
        raise CorruptAdapterError(f"{path / 'adapter_config.json'}: {exc}") from None

    def refuse_variants(name: str, roles: dict[str, torch.Tensor]) -> None:
        for role, what in _UNSUPPORTED.items():
            if role in roles:
                raise UnsupportedAdapterError(f"{path}: layer {name} has a {role} tensor, which means {what}; "
                                              "its ΔW is not scaling·B·A")

    try:
        adapter = AdapterWeights.from_peft_state_dict(tensors, config, raw_config, on_target=refuse_variants,
                                                      source=path)
    except UnsupportedAdapterError:
        raise
    except ValueError as exc:  # a factor missing
        raise CorruptAdapterError(f"{path}: {exc}") from None
    if not adapter.targets:
        raise NotAnAdapterError(f"{path} holds no LoRA tensors (no A/B factor keys in PEFT's naming)")
    for target in adapter.targets.values():
        _check_target(path, target, config)
    return adapter


def _check_target(path: Path, target: TargetWeights, config: LoraConfig) -> None:
    """Shapes that multiply, a dense conv delta, and the rank the config gives the layer."""
    a, b, name = target.lora_a, target.lora_b, target.path
    rank = a.shape[0]
    if target.kind == "conv":
        if b.dim() == a.dim() and b.shape[1] != rank and b.shape[1] and rank % b.shape[1] == 0:
            raise UnsupportedAdapterError(f"{path}: layer {name} is LoRA on a grouped convolution (B reads "
                                          f"{b.shape[1]} of {rank} rank channels per group); its ΔW is not a "
                                          "dense scaling·B·A")
        if b.dim() != a.dim() or any(s != 1 for s in b.shape[2:]):
            raise UnsupportedAdapterError(f"{path}: layer {name} has conv factors {tuple(a.shape)} / "
                                          f"{tuple(b.shape)}; only B with a 1×1 kernel is supported")
    elif a.dim() != 2 or b.dim() != 2:
        b = b.new_empty(0, 0)  # fails the check below
    if b.dim() < 2 or b.shape[1] != rank:
        raise CorruptAdapterError(
            f"{path}: layer {name} has A {tuple(a.shape)} and B {tuple(target.lora_b.shape)}, "
            "which don't multiply (A must be (r, in), B (out, r))"
        )
    expected = config.rank_for(name)
    if rank != expected:
        raise CorruptAdapterError(
            f"{path}: layer {name} stores rank {rank} but adapter_config.json gives it r={expected} "
            "(check r / rank_pattern)"
        )


def write_adapter(path: str | os.PathLike, layers: Mapping[str, TargetWeights], base_config: Mapping[str, Any],
                  extra: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write layers as a PEFT-format adapter folder (atomic per file), config derived from base_config.

    r / lora_alpha become the most common layer rank / alpha; other layers go to rank_pattern /
    alpha_pattern under their full module names. Targeting keys (target_modules, ...) are kept.
    """
    if not layers:
        raise ValueError("an adapter needs at least one layer")
    rslora = {layer.use_rslora for layer in layers.values()}
    if len(rslora) != 1:
        raise ValueError("all layers of one adapter must agree on use_rslora")
    ranks = Counter(layer.rank for layer in layers.values())
    alphas = Counter(layer.alpha for layer in layers.values())
    r = max(ranks, key=lambda k: (ranks[k], k))
    alpha = max(alphas, key=lambda k: (alphas[k], k))
    config = dict(base_config)
    config.update(
        r=r,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        use_rslora=rslora.pop(),
        rank_pattern={n: lay.rank for n, lay in layers.items() if lay.rank != r},
        alpha_pattern={n: lay.alpha for n, lay in layers.items() if lay.alpha != alpha},
    )
    if isinstance(config.get("target_modules"), list):  # a set in PEFT: sorted so the file is deterministic
        config["target_modules"] = sorted(config["target_modules"])
    _check_patterns(config, layers)
    tensors: dict[str, torch.Tensor] = dict(extra or {})
    for layer in layers.values():
        tensors.update(layer.peft_tensors(dtype))
    return write_adapter_folder(path, config, tensors)


def _check_patterns(config: dict[str, Any], layers: Mapping[str, TargetWeights]) -> None:
    """Full module names as pattern keys are regexes too: make sure each resolves to its own layer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolved = LoraConfig.from_dict(config)
    for name, layer in layers.items():
        if resolved.rank_for(name) != layer.rank or resolved.alpha_for(name) != layer.alpha:
            raise ValueError(f"rank_pattern/alpha_pattern would give layer {name} the wrong rank or alpha; "
                             "its name is a regex prefix of another layer's")
