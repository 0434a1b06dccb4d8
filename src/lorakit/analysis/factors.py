"""PEFT-format adapter folders as per-layer LoRA factors, and back.

    ΔW_layer = scaling · B·A,   A: (r, k), B: (d, r),   scaling = α/r  (α/√r with rsLoRA)

Linear layers store A as ``<module>.lora_A.weight`` (r, in) and B as ``.lora_B.weight`` (out, r);
embeddings as ``.lora_embedding_A`` (r, num_embeddings) / ``.lora_embedding_B`` (dim, r), so their
ΔW here is the transpose of the embedding's weight layout (norms and spectra don't change); conv
layers store A (r, in, kh, kw) and B (out, r, 1, 1), which we flatten to (r, in·kh·kw) / (out, r).
Rank and alpha per layer follow PEFT: ``rank_pattern`` / ``alpha_pattern`` keys are regexes matched
at the end of the module name on a dot boundary, first match wins.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lorakit.analysis.errors import CorruptAdapterError, NotAnAdapterError, UnsupportedAdapterError
from lorakit.core.arithmetic import LoraFactors
from lorakit.core.config import LoraConfig
from lorakit.errors import AdapterLoadError, ConfigError
from lorakit.io import CONFIG_NAME, read_adapter_folder, write_adapter_folder

PREFIX = "base_model.model."
_LINEAR_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_(?P<part>[AB])\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_embedding_(?P<part>[AB])$")
# tensors whose presence means ΔW is not scaling·B·A
_UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA (use_dora)",
    ".lora_B.bias": "lora_bias",
    ".lora_E": "AdaLoRA",
    ".base_layer.out_proj.lora_": "LoRA on nn.MultiheadAttention (PEFT adds the out_proj delta twice)",
}


@dataclass(frozen=True)
class LayerFactors:
    """One adapted layer: its factors, alpha and how to write them back."""

    name: str  # module path inside the base model (what rank_pattern keys match)
    kind: str  # "linear" | "embedding" | "conv": picks tensor names and on-disk shapes
    lora_a: torch.Tensor  # (r, k); a conv kernel is flattened to k = in·kh·kw
    lora_b: torch.Tensor  # (d, r)
    alpha: float  # this layer's lora_alpha, alpha_pattern applied
    use_rslora: bool  # scaling = α/√r instead of α/r
    a_tail: tuple[int, ...] = ()  # conv only: A's on-disk shape after r, e.g. (in, kh, kw)
    b_tail: tuple[int, ...] = ()  # conv only: B's trailing kernel dims, e.g. (1, 1)

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.lora_a.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.lora_b.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(d, k) of ΔW = scaling·B·A."""
        return (self.out_features, self.in_features)

    @property
    def scaling(self) -> float:
        return scaling_for(self.alpha, self.rank, self.use_rslora)

    @property
    def factors(self) -> LoraFactors:
        return LoraFactors(self.lora_a, self.lora_b, self.scaling)

    @property
    def num_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def with_factors(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> LayerFactors:
        """The same layer with new factors (any rank); alpha and rsLoRA are kept."""
        return replace(self, lora_a=lora_a, lora_b=lora_b)

    def peft_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The layer's tensors under PEFT's key names and shapes."""
        a = self.lora_a.to(dtype)
        b = self.lora_b.to(dtype)
        if self.kind == "embedding":
            return {f"{PREFIX}{self.name}.lora_embedding_A": a, f"{PREFIX}{self.name}.lora_embedding_B": b}
        if self.kind == "conv":
            a = a.reshape(self.rank, *self.a_tail)  # (r, in, kh, kw)
            b = b.reshape(self.out_features, self.rank, *self.b_tail)  # (out, r, 1, 1)
        return {f"{PREFIX}{self.name}.lora_A.weight": a, f"{PREFIX}{self.name}.lora_B.weight": b}


def scaling_for(alpha: float, rank: int, use_rslora: bool) -> float:
    """α/r, or α/√r with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class Adapter:
    """A LoRA adapter read from a folder: the config as written and its layers' factors."""

    path: Path | None  # where it was read from
    config: dict[str, Any]  # adapter_config.json, unchanged
    layers: dict[str, LayerFactors]  # module name -> factors, sorted by name
    extra: dict[str, torch.Tensor]  # non-LoRA tensors (modules_to_save, ...), copied through on write
    dtype: torch.dtype  # dtype of the stored factors; outputs are written in it

    @property
    def num_params(self) -> int:
        return sum(layer.num_params for layer in self.layers.values())


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read a PEFT-format LoRA adapter folder (safetensors, or legacy .bin without unpickling)."""
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

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    kinds: dict[str, str] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        for marker, what in _UNSUPPORTED.items():
            if marker in key:
                raise UnsupportedAdapterError(f"{path}: tensor {key} means {what}; its ΔW is not scaling·B·A")
        match = _LINEAR_KEY.match(key) or _EMBEDDING_KEY.match(key)
        if match is None:
            extra[key] = tensor
            continue
        name = match["name"]
        pairs.setdefault(name, {})[match["part"]] = tensor
        kinds[name] = "embedding" if "lora_embedding_" in key else ("conv" if tensor.dim() > 2 else "linear")
    if not pairs:
        raise NotAnAdapterError(f"{path} holds no LoRA tensors (no *.lora_A.weight / *.lora_embedding_A keys)")

    layers = {name: _layer(path, name, kinds[name], pairs[name], config) for name in sorted(pairs)}
    dtypes = Counter(layer.lora_a.dtype for layer in layers.values())
    dtype = dtypes.most_common(1)[0][0]
    return Adapter(path=path, config=raw_config, layers=layers, extra=extra, dtype=dtype)


def _layer(path: Path, name: str, kind: str, pair: Mapping[str, torch.Tensor], config: LoraConfig) -> LayerFactors:
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        raise CorruptAdapterError(f"{path}: layer {name} has no {missing} tensor; the adapter is incomplete")
    a, b = pair["A"], pair["B"]
    rank = a.shape[0]
    a_tail: tuple[int, ...] = ()
    b_tail: tuple[int, ...] = ()
    if kind == "conv":
        a_tail, b_tail = tuple(a.shape[1:]), tuple(b.shape[2:])
        if b.dim() == a.dim() and b.shape[1] != rank and b.shape[1] and rank % b.shape[1] == 0:
            raise UnsupportedAdapterError(f"{path}: layer {name} is LoRA on a grouped convolution (lora_B reads "
                                          f"{b.shape[1]} of {rank} rank channels per group); its ΔW is not a "
                                          "dense scaling·B·A")
        if b.dim() != a.dim() or any(s != 1 for s in b_tail):
            raise UnsupportedAdapterError(f"{path}: layer {name} has conv factors {tuple(a.shape)} / "
                                          f"{tuple(b.shape)}; only B with a 1×1 kernel is supported")
        a, b = a.reshape(rank, -1), b.reshape(b.shape[0], b.shape[1])  # (r, in·kh·kw), (out, r)
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
        raise CorruptAdapterError(
            f"{path}: layer {name} has lora_A {tuple(pair['A'].shape)} and lora_B {tuple(pair['B'].shape)}, "
            "which don't multiply (A must be (r, in), B (out, r))"
        )
    expected = config.rank_for(name)
    if rank != expected:
        raise CorruptAdapterError(
            f"{path}: layer {name} stores rank {rank} but adapter_config.json gives it r={expected} "
            "(check r / rank_pattern)"
        )
    return LayerFactors(name=name, kind=kind, lora_a=a, lora_b=b, alpha=config.alpha_for(name),
                        use_rslora=bool(config.use_rslora), a_tail=a_tail, b_tail=b_tail)


def write_adapter(path: str | os.PathLike, layers: Mapping[str, LayerFactors], base_config: Mapping[str, Any],
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


def _check_patterns(config: dict[str, Any], layers: Mapping[str, LayerFactors]) -> None:
    """Full module names as pattern keys are regexes too: make sure each resolves to its own layer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolved = LoraConfig.from_dict(config)
    for name, layer in layers.items():
        if resolved.rank_for(name) != layer.rank or resolved.alpha_for(name) != layer.alpha:
            raise ValueError(f"rank_pattern/alpha_pattern would give layer {name} the wrong rank or alpha; "
                             "its name is a regex prefix of another layer's")
