"""Loading an adapter into the served model, with the checks a shared base needs.

The server runs every adapter and the plain base on one :class:`LoraModel` (built with no
adapters at start-up). An adapter that would change the shared base, apply to every row of a
batch, or overflow the activations is refused here, before any request can use it. Only the
engine's worker thread calls these (between decode steps), so no lock is needed around the model.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from lorakit.core import pooled
from lorakit.core.layers import LoraParameter
from lorakit.core.model import LoraModel
from lorakit.errors import AdapterLoadError
from lorakit.io.adapter_folder import read_adapter_config

logger = logging.getLogger(__name__)
MAX_DELTA = 1e30  # bound on any ΔW entry a served adapter may have (fp32 overflows at 3.4e38)


def load_served_adapter(model: LoraModel, name: str, folder: str | os.PathLike,
                        root: str | os.PathLike | None = None) -> None:
    """Load a PEFT-format adapter folder under `name` (the model is unchanged if it fails).

    root: read only files inside it (see :mod:`lorakit.io.rooted`).
    """
    _refuse_base_rewrite(read_adapter_config(folder, root), folder)  # before anything is loaded
    model.load_adapter(folder, adapter_name=name, root=root)
    try:  # the folder may have changed since it was read above: check what was actually loaded
        _refuse_base_rewrite(vars(model.peft_config[name]), folder)
        _refuse_raw_parameters(model, name, folder)
    except AdapterLoadError:
        model.delete_adapter(name)  # puts a PiSSA/OLoRA residual back bit for bit
        raise
    if not _sane(model, name):  # refuse it now rather than fail every request that uses it
        model.delete_adapter(name)
        raise AdapterLoadError(f"adapter {name!r} in {folder} has NaN/inf weights, or factors so large that "
                               f"scaling·B·A exceeds {MAX_DELTA:g} and would overflow the activations")
    logger.info("loaded adapter %s from %s", name, folder)


def prepare_served_adapter(model: LoraModel, name: str, folder: str | os.PathLike,
                           root: str | os.PathLike | None = None) -> pooled.ServedAdapter | None:
    """Read and validate `folder` once, through :func:`load_served_adapter` (every check of the module path).

    Plain LoRA on Linear layers comes back as factors for the layers' pools (:func:`lorakit.core.pooled.install`
    makes it resident) and the module copy is dropped again; anything else (variants, modules_to_save, ...) stays
    loaded as a module under `name` and None is returned.
    """
    load_served_adapter(model, name, folder, root=root)
    if not pooled.servable(model, name):
        return None
    served = pooled.extract_served(model, name)
    model.delete_adapter(name)
    return served


def unload_served_adapter(model: LoraModel, name: str) -> None:
    """Evict `name`: a pooled adapter gives its slot back, a module adapter is deleted (an unknown name is not
    an error: eviction may race a delete)."""
    if name in model._served:
        pooled.uninstall(model, model._served[name])
    elif name in model.peft_config:
        model.delete_adapter(name)
        logger.info("unloaded adapter %s", name)


def _refuse_raw_parameters(model: LoraModel, name: str, folder) -> None:
    """A target_parameters adapter changes a weight every row shares: the per-row adapter choice
    of a served batch can't apply to it, so every forward (base rows included) would fail."""
    for layer in model.lora_layers():
        if isinstance(layer, LoraParameter) and name in layer.adapters:
            raise AdapterLoadError(
                f"{folder}: the adapter uses target_parameters ({layer.param_name!r}), a weight shared by every "
                "row of a batch, so it can't be served beside the base and other adapters. Merge it "
                "(lorakit merge) and serve the merged checkpoint as the base")


def _sane(model: LoraModel, name: str) -> bool:
    """Finite factors, and |scaling·B·A| ≤ scaling·‖B‖·‖A‖ (Frobenius, fp64) ≤ MAX_DELTA everywhere."""
    for layer in model.lora_layers():
        adapter = layer.adapters[name] if name in layer.adapters else None
        if adapter is None:
            continue
        if not all(bool(torch.isfinite(p).all()) for p in adapter.parameters()):
            return False
        bound = abs(adapter.scaling) * float(adapter.lora_a.double().norm()) * float(adapter.lora_b.double().norm())
        if not math.isfinite(bound) or bound > MAX_DELTA:
            return False
    return True


def _refuse_base_rewrite(config: dict, folder) -> None:
    """Refuse an adapter that changes the shared base model in place.

    The server runs every adapter and the plain base (``model`` = the base name) on one base
    model. A PiSSA/OLoRA adapter writes its residual W0 − s·B0·A0 into the base weights and a
    ``bias="all"``/``"lora_only"`` adapter overwrites base biases, so loading one would silently
    change the outputs of the base and of every other adapter.
    """
    init = config.get("init_lora_weights")
    if isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
        raise AdapterLoadError(
            f"{folder}: init_lora_weights={init!r} rewrites the base weights (W0 - s*B0*A0), which would change "
            "the base model and every other adapter served beside it. Convert it to a plain LoRA relative to "
            "the original base (PEFT's path_initial_model_for_weight_conversion, or "
            "lorakit.core.variants.pissa.to_lora_factors), or merge it (lorakit merge) and serve that as the base")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterLoadError(
            f"{folder}: bias={bias!r} overwrites the base model's biases, which would change the base model "
            "and every other adapter served beside it. Merge it (lorakit merge) and serve the merged "
            "checkpoint as the base, or retrain with bias='none' (lora_bias=True keeps a per-adapter bias)")
