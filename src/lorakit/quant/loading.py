"""Streaming 4-bit loading: build a transformers model straight from its safetensors checkpoint.

The model skeleton is created with its parameters on the meta device (no memory); then the
checkpoint is read one tensor at a time, and each Linear weight is quantised as it arrives, so
peak memory is about the 4-bit model plus one full-precision layer:

    peak ≈ Σ 4-bit layers + unquantised tensors (embeddings, norms) + max_layer(out·in·4 bytes)

Every tensor is read through its own short-lived ``safe_open``: a handle kept open keeps the
mmap'ed file resident and counted in RSS, which would defeat the point.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .convert import linear_targets, set_submodule
from .linear4bit import Linear4bit, _check_compute_dtype
from .nf4 import dequantize_4bit, quantize_4bit
from .state import QuantState, check_blocksize

_QS_MARK = ".quant_state.bitsandbytes__"


@contextmanager
def empty_weights() -> Iterator[None]:
    """Create modules with their parameters on the meta device; buffers (e.g. rotary tables,
    computed in ``__init__`` and not stored in checkpoints) stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            kept = module._parameters[name]
            module._parameters[name] = type(kept)(kept.to("meta"), requires_grad=kept.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (single file or sharded with an index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({directory / name for name in weight_map.values()})
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {directory}")
    return files


class TensorReader:
    """Key → file map of a checkpoint; ``get`` reads one tensor through a fresh handle.

    The one reader of bitsandbytes-format 4-bit checkpoints (``lorakit.quant`` loading and
    ``lorakit merge`` both use it): a packed weight ``W`` carries side entries ``W.absmax``,
    ``W.quant_map``, ``W.nested_*`` and ``W.quant_state.bitsandbytes__nf4|fp4``;
    :meth:`get_4bit` returns the packed tensor with its :class:`QuantState`, :meth:`get_dense` any
    tensor in full precision (a 4-bit one dequantised), one tensor at a time.
    """

    def __init__(self, files: Iterable[Path]):
        from safetensors import safe_open

        self._open = safe_open
        self.where: dict[str, Path] = {}
        for path in files:
            with safe_open(path, framework="pt") as fh:
                self.where.update(dict.fromkeys(fh.keys(), path))
        # packed 4-bit tensor -> its side entries (keys under it: "W.absmax", "W.quant_state...")
        self.side: dict[str, list[str]] = {k.split(_QS_MARK)[0]: [] for k in self.where if _QS_MARK in k}
        for key in self.where:
            owner = next((p for p in _prefixes(key) if p in self.side), None)
            if owner is not None:
                self.side[owner].append(key)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str, copy: bool = True) -> torch.Tensor:
        """Tensor `key`: a copy, or with ``copy=False`` a view of the file's memory mapping.

        A view costs nothing to read and its pages are the page cache's (counted in RSS only once
        touched, and reclaimable), but it keeps the whole file mapped as long as it lives and reads
        whatever the file holds if it is overwritten in place. The 4-bit loader takes views (what it
        quantises is dropped at once; what it keeps is the model, as transformers' own loading maps
        it); the streaming merge takes copies, so a finished shard releases its source files.
        """
        with self._open(self.where[key], framework="pt") as fh:
            tensor = fh.get_tensor(key)
            return tensor.clone() if copy else tensor

    def quantized(self) -> list[str]:
        """The packed 4-bit tensors' keys (those with a bitsandbytes quant_state)."""
        return sorted(self.side)

    def dense_keys(self) -> list[str]:
        """Every tensor of the model: the checkpoint's keys without the 4-bit side entries."""
        side = {k for keys in self.side.values() for k in keys}
        return [k for k in self.where if k not in side]

    def get_state(self, key: str, device: torch.device | str = "cpu") -> QuantState:
        """The QuantState of a 4-bit entry; ValueError names the key when its entries don't fit."""
        try:
            return QuantState.from_dict({k: self.get(k) for k in self.side[key]}, device=device)
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"can't read the 4-bit state of {key}: {exc}") from None

    def get_4bit(self, key: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, QuantState]:
        """(packed tensor, its QuantState) of a 4-bit entry."""
        state = self.get_state(key, device)
        return self.get(key).to(device), state

    def get_dense(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor in full precision (`dtype`, default its own; a 4-bit one is dequantised to fp32 or `dtype`)."""
        if key not in self.side:
            tensor = self.get(key)
            return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        packed, state = self.get_4bit(key)
        try:
            return dequantize_4bit(packed, state, dtype or torch.float32)
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"can't dequantise {key}: {exc}") from None


def _prefixes(key: str) -> list[str]:
    """'a.b.c' -> ['a.b', 'a'] (the keys a packed tensor's side entries hang under), longest first."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> bool:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return False
    if attr in module._parameters and module._parameters[attr] is not None:
        old = module._parameters[attr]
        if tuple(old.shape) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint tensor {key} has shape {tuple(tensor.shape)}, model expects {tuple(old.shape)}"
            )
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
        return True
    if attr in module._buffers:
        module._buffers[attr] = tensor
        return True
    return False


def _build_skeleton(model_class: Any, config: Any) -> nn.Module:
    with empty_weights():
        if hasattr(model_class, "from_config"):  # Auto* classes
            return model_class.from_config(config)
        return model_class._from_config(config)


@torch.no_grad()
def load_4bit(
    checkpoint_dir: str | os.PathLike,
    model_class: Any = None,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    skip: Iterable[str] = ("lm_head",),
    compute_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a transformers checkpoint with every Linear (but ``skip`` and the head) in 4 bits.

    A full-precision checkpoint is quantised layer by layer while it streams in; a checkpoint
    that is already 4-bit (its config has a bitsandbytes ``quantization_config``) is loaded as is
    and the quantisation arguments are ignored.

    Args:
        model_class: a transformers model class or Auto class (default ``AutoModelForCausalLM``).
        dtype: cast the tensors that stay in full precision (embeddings, norms) to this dtype;
            None keeps the checkpoint's dtype. The 4-bit weights remember their own dtype.
        compute_dtype: matmul dtype of the 4-bit layers (None: the dtype each was quantised from).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    check_blocksize(blocksize)
    _check_compute_dtype(compute_dtype)
    directory = Path(checkpoint_dir)
    config = AutoConfig.from_pretrained(directory)
    prequantized = getattr(config, "quantization_config", None)
    if prequantized is not None:
        method = prequantized.get("quant_method") if isinstance(prequantized, dict) else None
        if method not in (None, "bitsandbytes"):
            raise ValueError(
                f"{directory} is quantised with {method!r}; only bitsandbytes 4-bit folders load here"
            )
        del config.quantization_config
    model = _build_skeleton(model_class or AutoModelForCausalLM, config)
    reader = TensorReader(checkpoint_files(directory))

    if prequantized is not None:
        targets = [k.removesuffix(".weight") for k in reader.quantized() if k.endswith(".weight")]
    else:
        targets = linear_targets(model, skip)
    consumed: set[str] = set()
    for name in targets:
        weight_key, bias_key = f"{name}.weight", f"{name}.bias"
        if weight_key not in reader:
            raise ValueError(f"checkpoint {directory} has no {weight_key}")
        if prequantized is not None:
            packed, state = reader.get_4bit(weight_key, device)
            consumed.update(reader.side[weight_key])
        else:
            # the one full-precision layer held at a time, read from the mapping (no copy: dropped once quantised)
            weight = reader.get(weight_key, copy=False).to(device)
            packed, state = quantize_4bit(weight, blocksize, double_quant, quant_type)
            del weight
        bias = reader.get(bias_key).to(device) if bias_key in reader else None
        if bias is not None and dtype is not None:
            bias = bias.to(dtype)
        set_submodule(model, name, Linear4bit(packed, state, bias, compute_dtype))
        consumed.update((weight_key, bias_key))

    unexpected = []
    for key in reader.where:
        if key in consumed:
            continue
        tensor = reader.get(key, copy=False).to(device)  # kept as is: a view of the mapping, as transformers loads
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if not _set_tensor(model, key, tensor):
            unexpected.append(key)
    if unexpected:
        warnings.warn(
            f"ignored {len(unexpected)} checkpoint tensors the model has no place for: {unexpected[:5]}",
            stacklevel=2,
        )
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint {directory} lacks {len(missing)} parameters, e.g. {missing[:5]}")
    return model.eval()
