"""Adapter folders in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Writes are atomic per folder (:func:`lorakit.io.atomic.write_folder_atomically`): the new config and
weights are written into a temporary sibling, fsynced and swapped in, so an interrupted save leaves
the previous complete folder or the new one, never a config that points at half-written weights. Reads never unpickle: a
legacy ``adapter_model.bin`` is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lorakit.errors import AdapterLoadError
from lorakit.io.atomic import atomic_write_bytes, write_folder_atomically

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def write_adapter_folder(folder: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                         metadata: dict[str, str] | None = None, shared: bool = False) -> Path:
    """Write (or replace) a PEFT-format adapter folder atomically; other files already in it are kept.

    shared: other processes write their own files into `folder` at the same time (a
    transformers.Trainer checkpoint under DDP, where every rank saves its RNG state beside the
    adapter). The folder is then never swapped, which could carry a file another process is
    writing into the folder being replaced, or lose it; each of the two files is replaced
    atomically on its own (weights first, the config last).
    """
    folder = Path(folder)
    # safetensors refuses shared or non-contiguous storage: give each tensor its own
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    weights = st_save(tensors, metadata={"format": "pt", **(metadata or {})})
    text = json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n"

    def fill(tmp: Path) -> None:
        (tmp / WEIGHTS_NAME).write_bytes(weights)
        (tmp / CONFIG_NAME).write_text(text)

    if shared:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / WEIGHTS_NAME, weights)
        atomic_write_bytes(folder / CONFIG_NAME, text.encode())
        return folder
    # the whole folder is swapped in at once (other adapters' subfolders, a README... carried over)
    write_folder_atomically(folder, fill, keep_existing=True)
    return folder


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_adapter_config(folder: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The parsed adapter_config.json of an adapter folder, or a clear AdapterLoadError.

    root: as in :func:`read_adapter_folder`.
    """
    folder = Path(folder)
    if root is not None:
        from lorakit.io.rooted import resolve_under

        resolve_under(Path(root), folder)  # the folder itself; each file is checked again as it is read
    if not folder.is_dir():
        raise AdapterLoadError(f"{folder} is not a folder; pass the adapter folder that holds {CONFIG_NAME}")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        subdirs = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file())
        hint = f" It has adapter subfolders: {', '.join(subdirs)}." if subdirs else ""
        raise AdapterLoadError(f"{folder} is not an adapter folder: {CONFIG_NAME} is missing.{hint}")
    try:
        config = json.loads(_read(config_path, root).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise AdapterLoadError(f"{config_path} is not valid JSON ({reason}); the file is corrupt") from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return config


def read_adapter_folder(folder: str | os.PathLike,
                        root: str | os.PathLike | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, tensors) of a PEFT-format adapter folder, or a clear AdapterLoadError.

    root: read only files that lie inside this folder after resolving symlinks, opened without
    following links (:mod:`lorakit.io.rooted`); a file or folder that leaves it is refused.
    """
    folder = Path(folder)
    config = read_adapter_config(folder, root)
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        try:
            tensors = st_load(_read(weights, root))
        except (SafetensorError, ValueError, OSError) as exc:
            if isinstance(exc, AdapterLoadError):
                raise
            raise AdapterLoadError(
                f"{weights} is truncated or corrupt ({exc}); re-save or re-download the adapter"
            ) from None
    elif (folder / LEGACY_WEIGHTS_NAME).is_file():
        legacy = folder / LEGACY_WEIGHTS_NAME
        data = _read(legacy, root)
        try:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for bad pickles
            raise AdapterLoadError(
                f"{legacy} could not be read safely ({type(exc).__name__}: {exc}); "
                "lorakit never unpickles arbitrary objects — convert it to safetensors"
            ) from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise AdapterLoadError(f"{legacy} does not hold a dict of tensors")
    else:
        raise AdapterLoadError(f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter is incomplete")
    return config, tensors


def _read(path: Path, root: str | os.PathLike | None) -> bytes:
    if root is None:
        return path.read_bytes()
    from lorakit.io.rooted import read_bytes_under

    return read_bytes_under(Path(root), path)
