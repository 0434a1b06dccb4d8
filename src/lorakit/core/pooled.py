"""Served adapters: plain LoRA factors that live only in the layers' factor pools.

A server rotating hundreds of adapters through memory can't build and tear down modules for each
one between decode steps (≈ 4-6 ms each on a 2-layer model: Parameters, inits, state-dict copy,
module walks). A *served* adapter is read and validated once through the ordinary load path
(:meth:`LoraModel.load_adapter`, so keys, shapes, rank/alpha patterns and scaling mean exactly what
they mean there), its factors are taken out as plain tensors (:func:`extract_served`), and the
module copy is dropped. Making it resident is then one slot in the shared
:class:`~lorakit.core.routing.SlotTable` and two small copies per layer into that layer's
:class:`~lorakit.core.routing.FactorPool` (:func:`install`); evicting zeroes those slices
(:func:`uninstall`). Rows routed to it (``adapter_names=[...]``) gather their factors from the pool.

Only plain LoRA on Linear-like layers qualifies: variants with their own math (DoRA, ...),
modules_to_save, trainable tokens and raw-parameter adapters keep the module path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.core.layers import LoraAdapter, LoraLayer, wrap_module
from lorakit.core.modules_to_save import TrainableCopies
from lorakit.core.targeting import named_wrappers
from lorakit.core.trainable_tokens import TrainableTokens
from lorakit.errors import AdapterError


@dataclass
class ServedAdapter:
    """One adapter's factors by module path: (path, A (r, in), B (out, r), scaling)."""

    name: str
    factors: list[tuple[str, torch.Tensor, torch.Tensor, float]]

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for _, a, b, _ in self.factors)


def servable(model, name: str) -> bool:
    """Whether module adapter `name` is plain LoRA on Linear-like layers only (pool-servable)."""
    found = False
    for _, module in named_wrappers(model.model):
        if isinstance(module, LoraLayer) and name in module.adapters:
            if type(module.adapters[name]) is not LoraAdapter or not module.row_gather:
                return False
            if module.adapters[name].lora_a.dim() != 2:
                return False
            found = True
        elif isinstance(module, TrainableCopies) and name in module.copies:
            return False
        elif isinstance(module, TrainableTokens) and name in module.adapter_names:
            return False
    return found


def extract_served(model, name: str) -> ServedAdapter:
    """The factors of module adapter `name` as plain tensors (copies), for :func:`install`."""
    if not servable(model, name):
        raise AdapterError(f"adapter {name!r} is not plain LoRA on Linear layers; it can't be pool-served")
    factors = []
    for path, module in named_wrappers(model.model):
        if isinstance(module, LoraLayer) and name in module.adapters:
            adapter = module.adapters[name]
            factors.append((path, adapter.lora_a.detach().clone(), adapter.lora_b.detach().clone(),
                            float(adapter.scaling)))
    return ServedAdapter(name, factors)


def mixture(name: str, parts: Sequence[ServedAdapter], weights: Sequence[float]) -> ServedAdapter:
    """Σ wᵢ·ΔWᵢ exactly, as one adapter of rank Σ rᵢ per layer: A = [A₁; A₂; …], B = [w₁s₁B₁, w₂s₂B₂, …]."""
    by_path: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for part, weight in zip(parts, weights):
        for path, a, b, scaling in part.factors:
            by_path.setdefault(path, []).append((a, b * (weight * scaling)))
    factors = [(path, torch.cat([a for a, _ in ab]), torch.cat([b for _, b in ab], dim=1), 1.0)
               for path, ab in by_path.items()]
    return ServedAdapter(name, factors)


def install(model, served: ServedAdapter) -> None:
    """Make `served` resident: a slot, and its factors written into each target layer's pool."""
    if served.name in model.peft_config or served.name in model._served:
        raise AdapterError(f"an adapter named {served.name!r} exists already")
    slot = model._slots.assign(served.name)
    wrapped = False
    try:
        for path, a, b, scaling in served.factors:
            layer = model.model.get_submodule(path)
            if not isinstance(layer, LoraLayer):  # first adapter on this layer: wrap it once
                layer = wrap_module(layer)
                if layer is None:
                    raise AdapterError(f"{path} can't carry a LoRA adapter")
                model._replace(path, layer)
                wrapped = True
            layer.ensure_factor_pool(a).write(slot, served.name, a, b, scaling)
    except BaseException:
        uninstall(model, served)
        raise
    finally:
        if wrapped:
            model._sync_wrappers()  # new wrappers join the model's routing and active state
    model._served[served.name] = served


def uninstall(model, served: ServedAdapter) -> None:
    """Evict `served`: zero its pool slices and free its slot (the host copy stays with the caller)."""
    for path, _, _, _ in served.factors:
        try:
            layer = model.model.get_submodule(path)
        except AttributeError:
            continue
        pool = layer.factor_pool if isinstance(layer, LoraLayer) else None
        if pool is not None:
            pool.clear(served.name)
    model._served.pop(served.name, None)
    model._slots.release(served.name)
