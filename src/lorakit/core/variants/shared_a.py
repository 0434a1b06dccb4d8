"""Shared A across tasks: several adapters use one A per layer, each task trains its own B.

    ΔW_task = s · B_task · A_shared

    model = get_lora_model(base, LoraConfig(r=8, target_modules=[...]), adapter_name="taskA")
    model.add_adapter("taskB", LoraConfig(r=8, target_modules=[...], shared_a_with="taskA"))

The shared A belongs to the adapter named in ``shared_a_with`` (its *owner*) and trains whenever
the owner is trainable (e.g. ``set_adapter(["taskA", "taskB"])`` for joint multi-task training
with ``adapter_names=`` routing); training a sharer alone trains only its B. Targets and rank must
match the owner's. Mixed batches work as for plain LoRA (the shared A is applied once per
adapter present).

File format: every adapter folder is a complete PEFT LoRA folder (its own copy of A, so it loads
standalone in PEFT or lorakit). The sharer's ``adapter_config.json`` adds ``"shared_a_with":
"<owner name>"`` (PEFT ignores the key with a warning). Loading such a folder into a model that
already holds the owner ties A again if the folder's A tensors equal the owner's bit for bit;
otherwise (or if the owner isn't loaded yet) the adapter loads standalone with a warning. So:
load the owner first, then the sharers.
"""

from __future__ import annotations

import warnings

import torch

from lorakit.core.adapter_weights import normalise_key
from lorakit.core.config import LoraConfig
from lorakit.core.layers import LoraAdapter, LoraLayer
from lorakit.core.state_dict import adapter_tensor_refs
from lorakit.errors import ConfigError


class SharedAAdapter(LoraAdapter):
    """A plain LoRA adapter whose A is the owner adapter's A (not a parameter of its own)."""

    @property
    def lora_a(self) -> torch.Tensor:
        owner = self.__dict__.get("_owner")
        if owner is not None:
            return owner.lora_a
        params = self.__dict__["_parameters"]
        if "lora_a" in params:  # before setup ties it: the adapter's own (soon discarded) A
            return params["lora_a"]
        raise AttributeError("lora_a")

    def setup(self, layer: LoraLayer, config: LoraConfig) -> None:
        owner_name = config.shared_a_with
        if owner_name not in layer.adapters:
            raise ConfigError(f"shared_a_with={owner_name!r}: that adapter is not on this layer; add it first, "
                              "with the same target_modules")
        owner = layer.adapters[owner_name]
        while isinstance(owner, SharedAAdapter):  # chains share the root's A
            owner = owner.owner
        if tuple(owner.lora_a.shape) != tuple(self._parameters["lora_a"].shape):
            raise ConfigError(f"shared_a_with={owner_name!r}: its A is {tuple(owner.lora_a.shape)} here but this "
                              f"adapter's would be {tuple(self._parameters['lora_a'].shape)}; use the same r")
        del self._parameters["lora_a"]
        object.__setattr__(self, "_owner", owner)  # a plain reference: not a submodule, not saved twice

    @property
    def owner(self) -> LoraAdapter:
        return self.__dict__["_owner"]

    def extra_repr(self) -> str:
        return super().extra_repr() + ", shared_a=True"


def prepare_load(model: torch.nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> LoraConfig:
    """Keep ``shared_a_with`` only if the owner is loaded and the file's A equals the owner's A."""
    owner = config.shared_a_with
    if owner not in getattr(model, "peft_config", {}):
        warnings.warn(f"this adapter shares A with {owner!r}, which is not loaded; loading it standalone "
                      "(load the owner first to keep the sharing)", stacklevel=4)
        return config.replace(shared_a_with=None)
    inner = getattr(model, "model", model)
    owner_a = set()
    for module in inner.modules():
        if isinstance(module, LoraLayer) and owner in module.adapters:
            owner_a.add(id(module.adapters[owner].lora_a))
    given = {normalise_key(k): v for k, v in tensors.items()}
    for key, ref in adapter_tensor_refs(inner, owner).items():
        if id(ref) in owner_a and not (key in given and torch.equal(given[key].to(ref.device, ref.dtype), ref.detach())):
            warnings.warn(f"this adapter's A differs from {owner!r}'s (e.g. {key}); loading it standalone",
                          stacklevel=4)
            return config.replace(shared_a_with=None)
    return config
