"""LoraModel's save / load half: PEFT-format folders in and out, through the adapter type.

A mixin of :class:`~lorakit.core.model.LoraModel`. The tensors go through
:mod:`lorakit.core.state_dict` (the module tree <-> :class:`~lorakit.core.adapter_weights.AdapterWeights`);
the folder itself is :mod:`lorakit.io` (atomic writes, validated reads).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn as nn

from lorakit.core.config import LoraConfig
from lorakit.core.model_build import base_tensors
from lorakit.core.state_dict import get_adapter_state_dict, load_adapter_state_dict
from lorakit.core.variants import config_class_for_peft_type, prepare_load
from lorakit.errors import AdapterError, AdapterLoadError, ConfigError
from lorakit.io import read_adapter_folder, write_adapter_folder
from lorakit.io.config_validation import validate_adapter_config, validate_adapter_tensors

_Model = TypeVar("_Model", bound="AdapterIOMixin")


class AdapterIOMixin:
    """save_pretrained / from_pretrained / load_adapter / load_adapter_weights for LoraModel.

    Uses the model's ``model``, ``peft_config``, ``add_adapter``, ``delete_adapter``,
    ``set_adapter`` and its enabled/active state.
    """

    def save_pretrained(self, save_directory: str | os.PathLike,
                        selected_adapters: Iterable[str] | None = None, shared_folder: bool = False) -> None:
        """One PEFT-format folder per adapter ("default" at the top, others in a subfolder).

        Args:
            save_directory: the folder to write (created; each folder swapped in atomically).
            selected_adapters: the adapters to save (default: all).
            shared_folder: other processes write into `save_directory` at the same time (a Trainer
                checkpoint under DDP): each file is then replaced atomically on its own instead of
                the folder being swapped (see :func:`lorakit.io.adapter_folder.write_adapter_folder`).

        The tensors are the adapter's :class:`~lorakit.core.adapter_weights.AdapterWeights`
        (``state_dict.export_adapter_weights``) under PEFT's key names.
        """
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        if not names:
            raise AdapterError("nothing to save: the model has no adapters (add_adapter or load_adapter first)"
                               if not self.peft_config else "selected_adapters is empty: name at least one adapter")
        for name in names:
            if name not in self.peft_config:
                raise AdapterError(f"no adapter named {name!r}; adapters: {sorted(self.peft_config)}")
        for name in names:
            config = self.peft_config[name]
            folder = Path(save_directory) if name == "default" else Path(save_directory) / name
            data = config.to_dict()
            data["inference_mode"] = True
            if data.get("base_model_name_or_path") is None:
                data["base_model_name_or_path"] = getattr(getattr(self.model, "config", None), "_name_or_path", None)
            write_adapter_folder(folder, data, get_adapter_state_dict(self.model, name, config.bias),
                                 shared=shared_folder)

    @classmethod
    def from_pretrained(cls: type[_Model], model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, root: str | os.PathLike | None = None) -> _Model:
        """Wrap `model` and load the adapter folder. If it fails, `model` is left exactly as it was
        (weights bit for bit, requires_grad flags, modules).

        Args:
            model: the base model the adapter was trained on.
            adapter_dir: a PEFT-format adapter folder (PEFT's or lorakit's).
            adapter_name: the name it gets here.
            is_trainable: load it trainable (default: frozen, ``inference_mode``).
            root: read only files inside this folder (symlinks resolved and checked, no link
                followed while opening), as ``lorakit serve --adapter-root`` does.
        """
        config, tensors = read_config_and_tensors(adapter_dir, is_trainable, root)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            lora_model = cls(model)
            lora_model._load(adapter_name, config, tensors)
            lora_model.set_adapter(adapter_name)
        except BaseException:
            for p, flag in flags:
                p.requires_grad_(flag)
            raise
        return lora_model

    def load_adapter(self, adapter_dir: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     root: str | os.PathLike | None = None) -> None:
        """Add an adapter from a PEFT-format folder. A failed load leaves the model exactly as it was.

        Args:
            adapter_dir: a PEFT-format adapter folder.
            adapter_name: the name it gets here (not yet used in this model).
            is_trainable: load it trainable (default: frozen).
            root: as in :meth:`from_pretrained`.
        """
        config, tensors = read_config_and_tensors(adapter_dir, is_trainable, root)
        self._load(adapter_name, config, tensors)

    def load_adapter_weights(self, adapter_dir: str | os.PathLike, adapter_name: str = "default") -> None:
        """Copy a saved folder's tensors into the existing adapter `adapter_name`, in place.

        The parameters keep their identity, so an optimizer that holds them stays valid: this is how
        a training checkpoint is resumed (lorakit.integrations.transformers). The folder must hold
        the same adapter layout (keys, shapes and scaling fields); every check runs before the first
        copy, so a refused folder changes nothing.
        """
        if adapter_name not in self.peft_config:
            raise AdapterError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        config, tensors = read_config_and_tensors(adapter_dir, is_trainable=True)
        live = self.peft_config[adapter_name]
        fields = ("peft_type", "lora_alpha", "alpha_pattern", "use_rslora", "use_dora", "bias")
        differ = [f for f in fields if getattr(config, f, None) != getattr(live, f, None)]
        if differ:
            raise AdapterLoadError(f"{Path(adapter_dir) / 'adapter_config.json'}: {differ} differ from adapter "
                                   f"{adapter_name!r} (the same tensors would give other outputs); load it as a "
                                   "new adapter with load_adapter instead")
        load_adapter_state_dict(self.model, adapter_name, tensors, live.bias)

    def _load(self, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
        """add_adapter + copy the tensors, as one transaction: on failure everything is put back.

        Only flags outside the adapters already loaded can change (the new adapter is deleted on
        failure), so only those are recorded: the k-th load costs what the first did.
        """
        flags = [(p, p.requires_grad) for p in base_tensors(self.model, buffers=False)]
        active, disabled = list(self.active_adapters), self._disabled
        try:
            config = prepare_load(self, config, tensors)  # e.g. keeps a shared A only if the file agrees
            self.add_adapter(name, config)
            load_adapter_state_dict(self.model, name, tensors, config.bias)
        except BaseException:
            if name in self.peft_config:
                self.delete_adapter(name)  # unwraps new wrappers; PiSSA puts the base back bit for bit
            for p, flag in flags:
                p.requires_grad_(flag)
            self.active_adapters = active
            self._set_disabled(disabled)
            for module in self._wrappers():
                module.active_adapters = list(active)
            raise


def read_config_and_tensors(adapter_dir: str | os.PathLike, is_trainable: bool,
                            root: str | os.PathLike | None = None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """An adapter folder's config and tensors, validated before anything touches a model."""
    data, tensors = read_adapter_folder(adapter_dir, root=root)
    folder = Path(adapter_dir)
    validate_adapter_config(data, str(folder / "adapter_config.json"))  # types and ranges, naming the key
    validate_adapter_tensors(tensors, str(folder))  # float and finite, before anything is copied
    try:
        config = _config_from_dict(data)
    except (ConfigError, TypeError, ValueError) as exc:
        raise AdapterLoadError(f"{Path(adapter_dir) / 'adapter_config.json'}: {exc}") from None
    config.inference_mode = not is_trainable
    return config, tensors


def _config_from_dict(data: dict) -> LoraConfig:
    peft_type = str(data.get("peft_type", "LORA")).upper()
    if peft_type == "LORA":
        return LoraConfig.from_dict(data)
    return config_class_for_peft_type(peft_type).from_dict(data)
