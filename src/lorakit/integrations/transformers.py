"""transformers.Trainer (and TRL's trainers) with lorakit models: PEFT-format checkpoints, resume.

Trainer recognises adapters only by ``isinstance(model, peft.PeftModel)``; any other module gets
its full ``state_dict()`` written as ``model.safetensors`` (the frozen base included, under
lorakit's internal key names). Subclassing is the integration point Trainer documents, so a small
mixin overrides the places that decide how the model is saved, read back and introspected:

* ``_save``: checkpoints and ``save_model()`` write ``model.save_pretrained(folder)``: the
  PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``, other adapters in
  sub-folders), as a PeftModel's checkpoint holds; optimizer, scheduler, RNG and trainer state
  stay Trainer's own files beside it;
* ``_load_from_checkpoint`` (``resume_from_checkpoint``) and ``_load_best_model``
  (``load_best_model_at_end``): the folder's tensors are copied into the live adapters in place
  (``LoraModel.load_adapter_weights``), so parameter identity and the optimizer survive;
* ``__init__`` and ``_set_signature_columns_if_needed``: label names, ``can_return_loss`` and
  the dataset columns to keep are read off the wrapped model's ``forward``, as Trainer does for
  a PeftModel's base model (LoraModel.forward takes ``*args, **kwargs``).

Models that are not LoraModels go through Trainer's own code unchanged. Usage::

    from lorakit.integrations.transformers import LoraTrainer, with_lora_checkpoints
    trainer = LoraTrainer(model=lora_model, args=TrainingArguments(...), train_dataset=ds)
    SFTTrainer = with_lora_checkpoints(trl.SFTTrainer)   # any Trainer subclass
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from lorakit.core.model import LoraModel
from lorakit.core.state_dict import get_adapter_state_dict, load_adapter_state_dict
from lorakit.errors import AdapterLoadError, ConfigError

logger = logging.getLogger(__name__)

_WRAPPERS = ("module", "_orig_mod")  # DDP / DataParallel, torch.compile


def find_lora_model(model: Any) -> LoraModel | None:
    """The LoraModel inside `model` (DDP and torch.compile wrappers looked through), or None."""
    for _ in range(8):
        if isinstance(model, LoraModel):
            return model
        modules = getattr(model, "_modules", None) or {}
        inner = next((modules[n] for n in _WRAPPERS if n in modules), None)
        if inner is None:
            return None
        model = inner
    return None


def adapter_folders(model: LoraModel, checkpoint_dir: str | os.PathLike) -> dict[str, Path]:
    """Where save_pretrained put each adapter: "default" at the top, the others in sub-folders."""
    root = Path(checkpoint_dir)
    return {name: root if name == "default" else root / name for name in model.peft_config}


def load_checkpoint_adapters(model: LoraModel, checkpoint_dir: str | os.PathLike) -> None:
    """Copy every adapter saved in `checkpoint_dir` into `model`'s adapters of the same names, in place.

    All folders are checked to exist before anything is copied, and if one adapter's folder is
    refused, the adapters already copied get their previous values back.
    """
    folders = adapter_folders(model, checkpoint_dir)
    missing = [str(f) for f in folders.values() if not (f / "adapter_config.json").is_file()]
    if missing:
        hint = (" (it holds model.safetensors: a checkpoint written by plain transformers.Trainer; resume it with "
                "transformers.Trainer, or start again)" if (Path(checkpoint_dir) / "model.safetensors").is_file()
                else "")
        raise AdapterLoadError(f"checkpoint {checkpoint_dir} has no adapter folder at {missing}{hint}; it must hold "
                               f"one for each adapter of the model ({sorted(folders)}), as LoraTrainer saves them")
    before = {name: get_adapter_state_dict(model.model, name, model.peft_config[name].bias) for name in folders}
    before = {name: {k: v.clone() for k, v in tensors.items()} for name, tensors in before.items()}
    done: list[str] = []
    try:
        for name, folder in folders.items():
            model.load_adapter_weights(folder, name)
            done.append(name)
    except BaseException:
        for name in done:
            load_adapter_state_dict(model.model, name, before[name], model.peft_config[name].bias)
        raise


class LoraCheckpointsMixin:
    """Put before a Trainer class: ``class MyTrainer(LoraCheckpointsMixin, Trainer)``.

    Checkpoints and ``save_model()`` of a LoraModel become PEFT adapter folders; resuming and
    ``load_best_model_at_end`` read them back into the live adapters. Other models are untouched.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        lora = find_lora_model(self.model)
        if lora is None:
            return
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ConfigError("a lorakit model under Trainer's FSDP/DeepSpeed is not supported (the adapter would be "
                              "saved from sharded tensors): run Trainer with DDP (torchrun) or use `lorakit train`")
        # Trainer reads these off the model class's forward signature (a PeftModel's base model's);
        # LoraModel.forward takes **kwargs, which would leave no label names and so no eval loss
        if self.args.label_names is None:
            self.label_names = find_labels(type(lora.model))
        self.can_return_loss = can_return_loss(type(lora.model))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        lora = find_lora_model(self.model)
        if lora is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:  # only the main process writes (DDP)
            return
        os.makedirs(output_dir, exist_ok=True)
        logger.info("saving the adapter(s) as PEFT folders to %s", output_dir)
        # from the live tensors (state_dict, full and under lorakit's keys, is not needed); file by file, not by
        # swapping the folder: under DDP the other ranks write their RNG state into it at the same time
        lora.save_pretrained(output_dir, shared_folder=True)
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as Trainer does

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        lora = find_lora_model(model if model is not None else self.model)
        folder = Path(resume_from_checkpoint)
        full_state = (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").is_file()
        if lora is None or full_state:  # not ours, or a full-state-dict checkpoint: Trainer's own loader reads it
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("loading the adapter(s) from %s", resume_from_checkpoint)
        load_checkpoint_adapters(lora, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        lora = find_lora_model(self.model)
        if lora is None:
            return super()._load_best_model()
        logger.info("loading the best adapter(s) from %s (score: %s)", self.state.best_model_checkpoint,
                    self.state.best_metric)
        load_checkpoint_adapters(lora, self.state.best_model_checkpoint)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        lora = find_lora_model(self.model)
        if lora is not None and "adapter_names" in (self._signature_columns or []):  # read off LoraModel.forward
            params = inspect.signature(lora.model.forward).parameters
            self._signature_columns = [*params, *sorted({"label", "label_ids", *self.label_names})]


class LoraTrainer(LoraCheckpointsMixin, Trainer):
    """transformers.Trainer whose checkpoints of a LoraModel are PEFT adapter folders."""


_CLASSES: dict[type, type] = {}


def with_lora_checkpoints(trainer_class: type) -> type:
    """`trainer_class` (a Trainer subclass, e.g. trl.SFTTrainer) with lorakit's checkpoint handling."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise ConfigError(f"with_lora_checkpoints takes a transformers.Trainer subclass, got {trainer_class!r}")
    if issubclass(trainer_class, LoraCheckpointsMixin):
        return trainer_class
    if trainer_class not in _CLASSES:
        _CLASSES[trainer_class] = type(f"Lora{trainer_class.__name__}", (LoraCheckpointsMixin, trainer_class),
                                       {"__module__": __name__, "__doc__": LoraCheckpointsMixin.__doc__})
    return _CLASSES[trainer_class]
