"""The model the engine runs: one base in memory plus any number of named LoRA adapters.

Only the engine's worker thread calls into a :class:`ModelHost` (forward passes and adapter
loads / unloads alike), so no lock is needed around the model.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from lorakit.core import pooled
from lorakit.core.model import LoraModel
from lorakit.errors import AdapterLoadError
from lorakit.io.adapter_folder import read_adapter_config

logger = logging.getLogger(__name__)
MAX_DELTA = 1e30  # bound on any ΔW entry a served adapter may have (fp32 overflows at 3.4e38)


def load_base_model(base_dir: str | os.PathLike, dtype: str = "float32") -> nn.Module:
    """A causal LM from a transformers checkpoint folder, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(Path(base_dir), dtype=getattr(torch, dtype))
    return model.eval()


class ModelHost:
    """The base model, wrapped in a :class:`LoraModel` once the first adapter is loaded."""

    def __init__(self, base: nn.Module):
        self.base = base
        self.lora: LoraModel | None = None
        # transformers' causal LMs accept logits_to_keep: prefill then computes one row of logits
        params = inspect.signature(base.forward).parameters
        self._keep_logits = "logits_to_keep" in params
        # transformers ≥ 5.2x renamed past_key_values to cache (the old name warns until 5.40)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @property
    def config(self):
        return self.base.config

    @property
    def adapters(self) -> list[str]:
        return [*self.lora.peft_config, *self.lora._served] if self.lora is not None else []

    def prepare(self, name: str, folder: str | os.PathLike,
                root: str | os.PathLike | None = None) -> pooled.ServedAdapter | None:
        """Read and validate `folder` once, through :meth:`load` (every check of the module path).

        Plain LoRA on Linear layers comes back as factors for the pool (:meth:`install`), and the
        module copy is dropped again; anything else (variants, modules_to_save, ...) stays loaded as
        a module under `name` and None is returned.
        """
        self.load(name, folder, root=root)
        if not pooled.servable(self.lora, name):
            return None
        served = pooled.extract_served(self.lora, name)
        self.lora.delete_adapter(name)
        return served

    def install(self, served: pooled.ServedAdapter) -> None:
        """Make a prepared adapter resident: one slot, its factors copied into each layer's pool."""
        pooled.install(self.lora, served)

    def load(self, name: str, folder: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
        """Load a PEFT-format adapter folder under `name` (the model is unchanged if it fails).

        root: read only files inside it (see :mod:`lorakit.io.rooted`).
        """
        _refuse_base_rewrite(read_adapter_config(folder, root), folder)  # before anything is loaded
        if self.lora is None:
            self.lora = LoraModel.from_pretrained(self.base, folder, adapter_name=name, root=root)
        else:
            self.lora.load_adapter(folder, adapter_name=name, root=root)
        try:  # the folder may have changed since it was read above: check what was actually loaded
            _refuse_base_rewrite(vars(self.lora.peft_config[name]), folder)
            self._refuse_raw_parameters(name, folder)
        except AdapterLoadError:
            self.lora.delete_adapter(name)  # puts a PiSSA/OLoRA residual back bit for bit
            raise
        if not self._sane(name):  # refuse it now rather than fail every request that uses it
            self.lora.delete_adapter(name)
            raise AdapterLoadError(f"adapter {name!r} in {folder} has NaN/inf weights, or factors so large that "
                                   f"scaling·B·A exceeds {MAX_DELTA:g} and would overflow the activations")
        logger.info("loaded adapter %s from %s", name, folder)

    def _refuse_raw_parameters(self, name: str, folder) -> None:
        """A target_parameters adapter changes a weight every row shares: the per-row adapter choice
        of a served batch can't apply to it, so every forward (base rows included) would fail."""
        from lorakit.core.layers import LoraParameter

        for layer in self.lora.lora_layers():
            if isinstance(layer, LoraParameter) and name in layer.adapters:
                raise AdapterLoadError(
                    f"{folder}: the adapter uses target_parameters ({layer.param_name!r}), a weight shared by every "
                    "row of a batch, so it can't be served beside the base and other adapters. Merge it "
                    "(lorakit merge) and serve the merged checkpoint as the base")

    def _sane(self, name: str) -> bool:
        """Finite factors, and |scaling·B·A| ≤ scaling·‖B‖·‖A‖ (Frobenius, fp64) ≤ MAX_DELTA everywhere."""
        for layer in self.lora.lora_layers():
            adapter = layer.adapters[name] if name in layer.adapters else None
            if adapter is None:
                continue
            if not all(bool(torch.isfinite(p).all()) for p in adapter.parameters()):
                return False
            bound = abs(adapter.scaling) * float(adapter.lora_a.double().norm()) * float(adapter.lora_b.double().norm())
            if not math.isfinite(bound) or bound > MAX_DELTA:
                return False
        return True

    def mix(self, name: str, components: Sequence[str], weights: Sequence[float]) -> None:
        """Add `name` = Σ wᵢ·ΔWᵢ of loaded adapters, exactly (their factors concatenated)."""
        self.lora.add_weighted_adapter(list(components), list(weights), name, combination_type="cat")

    def unload(self, name: str) -> None:
        if self.lora is not None and name in self.lora._served:
            pooled.uninstall(self.lora, self.lora._served[name])
        elif self.lora is not None and name in self.lora.peft_config:
            self.lora.delete_adapter(name)
            logger.info("unloaded adapter %s", name)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, adapter_names: Sequence[str | None], kv_cache=None,
                last_only: bool = False, **kwargs) -> torch.Tensor:
        """Logits (B, T or 1, V) with one adapter (or None = base) per row; `kv_cache` grows in place."""
        if last_only and self._keep_logits:
            kwargs["logits_to_keep"] = 1
        if kv_cache is not None:
            kwargs[self._cache_kw] = kv_cache
            kwargs["use_cache"] = True
        if self.lora is None:
            if any(n is not None for n in adapter_names):
                raise KeyError(f"no adapters are loaded, asked for {sorted({n for n in adapter_names if n})}")
            out = self.base(input_ids, **kwargs)
        else:
            out = self.lora(input_ids, adapter_names=list(adapter_names), **kwargs)
        return out.logits


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
