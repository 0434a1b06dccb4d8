"""LoraModel's weighted combination of adapters (PEFT's add_weighted_adapter).

A mixin of :class:`~lorakit.core.model.LoraModel`; the factor arithmetic itself is
:mod:`lorakit.core.arithmetic`, on tensors only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from lorakit.core import arithmetic
from lorakit.core.config import LoraConfig
from lorakit.core.layers import LoraLayer
from lorakit.core.layers.param import LoraParameter
from lorakit.core.modules_to_save import TrainableCopies
from lorakit.core.targeting import named_wrappers
from lorakit.core.variants import DoraAdapter
from lorakit.errors import AdapterError, ConfigError


class CombineMixin:
    """add_weighted_adapter for LoraModel (uses its ``model``, ``peft_config``, ``add_adapter``)."""

    @torch.no_grad()
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "cat", svd_rank: int | None = None) -> None:
        """Create `adapter_name` from a weighted combination of existing adapters.

        * ``cat`` (default): exact, ΔW = Σ wᵢ·ΔWᵢ with rank Σ rᵢ;
        * ``svd``: the best rank-`svd_rank` approximation of Σ wᵢ·ΔWᵢ (default: the largest rank of
          any adapter, rank_pattern included, on every layer: PEFT's rule);
        * ``linear``: PEFT's A = Σ sign(cᵢ)·√|cᵢ|·Aᵢ, B = Σ √|cᵢ|·Bᵢ with cᵢ = wᵢ·sᵢ (equal ranks;
          only approximates the sum).

        DoRA adapters combine as in PEFT: their low-rank factors are combined as above and the new
        adapter is DoRA again (when the first one is) with its magnitude starting at the base
        weight's norms, exactly what PEFT's add_weighted_adapter produces. Adapters with
        modules_to_save or trainable_token_indices are refused (those parts can't be weighted).

        Args:
            adapters: names of existing adapters.
            weights: one weight per adapter (may be negative).
            adapter_name: the new adapter's name.
            combination_type: ``"cat"``, ``"svd"`` or ``"linear"`` (above).
            svd_rank: the rank of ``svd``'s result (default: the largest input rank).
        """
        if len(adapters) != len(weights) or not adapters:
            raise ConfigError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
        unknown = [n for n in adapters if n not in self.peft_config]
        if unknown:
            raise AdapterError(f"no adapter named {unknown}; adapters: {sorted(self.peft_config)}")
        if combination_type not in ("cat", "svd", "linear"):
            raise ConfigError(f"combination_type must be 'cat', 'svd' or 'linear', got {combination_type!r}")
        configs = [self.peft_config[n] for n in adapters]
        for name, cfg in zip(adapters, configs):
            # these parts are copies / replaced rows, not low-rank deltas: a combination silently left
            # them out (a weight-1 "mixture" of one adapter gave other outputs than the adapter)
            extra = ("modules_to_save" if getattr(cfg, "modules_to_save", None)
                     else "trainable_token_indices" if getattr(cfg, "trainable_token_indices", None) else None)
            if extra:
                raise ConfigError(f"adapter {name!r} has {extra}: those modules/rows can't be combined by weight, "
                                  "so a weighted combination would silently drop them; combine adapters without "
                                  f"{extra}, or use that adapter on its own")
        global_rank = svd_rank or max(max([c.r, *map(int, c.rank_pattern.values())]) for c in configs)
        factors_by_path = {}
        for path, layer in named_wrappers(self.model):
            if not isinstance(layer, LoraLayer) or not any(n in layer.adapters for n in adapters):
                continue
            if isinstance(layer, LoraParameter):
                raise ConfigError(f"layer {path!r}: weighted combination does not support target_parameters "
                                  "(PEFT refuses it too)")
            odd = [n for n in adapters if n in layer.adapters and layer.adapters[n].custom_math
                   and not isinstance(layer.adapters[n], DoraAdapter)]
            if odd:
                raise ConfigError(f"layer {path!r}: adapter {odd[0]!r} is a {type(layer.adapters[odd[0]]).__name__}; "
                                  "weighted combination supports plain LoRA and DoRA adapters only")
            present = [(layer.adapters[n], w) for n, w in zip(adapters, weights) if n in layer.adapters]
            factors = [arithmetic.LoraFactors(ad.lora_a.flatten(1), ad.lora_b.flatten(1), ad.scaling)
                       for ad, _ in present]  # conv factors as (r, in·k) and (out, r)
            if getattr(layer, "groups", 1) > 1:
                raise ConfigError(f"layer {path!r} is a grouped convolution: B's groups split the rank axis, so its "
                                  "adapters can't be combined by concatenating or summing factors; exclude it")
            ws = [w for _, w in present]
            if combination_type == "cat":
                a, b, _ = arithmetic.concat(factors, ws, out_scaling=1.0)
            elif combination_type == "linear":
                if len(present) != len(adapters):
                    raise ConfigError(f"'linear' needs every adapter on every layer; {path!r} lacks some")
                a, b, _ = arithmetic.linear_peft(factors, ws)
            else:  # from the thin factors: no d×k matrix
                a, b, _ = arithmetic.weighted_sum(factors, ws, out_scaling=1.0, rank=global_rank)
            a_shape, b_shape = layer.adapter_shapes(a.shape[0])
            factors_by_path[path] = (a.reshape(a_shape), b.reshape(b_shape))  # back to the layer's layout
        ranks = {path: a.shape[0] for path, (a, _) in factors_by_path.items()}
        common = max(set(ranks.values()), key=list(ranks.values()).count)
        first = self.peft_config[adapters[0]]
        pattern = {re.escape(p): r for p, r in ranks.items() if r != common}
        config = LoraConfig(  # alpha = r everywhere: scaling 1, the weights live in B
            r=common, lora_alpha=common, rank_pattern=pattern, alpha_pattern=dict(pattern),
            target_modules=sorted(factors_by_path), lora_dropout=first.lora_dropout, bias=first.bias,
            use_dora=first.use_dora, use_rslora=False,
            modules_to_save=first.modules_to_save, task_type=first.task_type,
            base_model_name_or_path=first.base_model_name_or_path)
        self.add_adapter(adapter_name, config)
        for path, (a, b) in factors_by_path.items():  # the new layers are built from the type
            layer = self.model.get_submodule(path)
            layer.import_adapter(adapter_name, layer.export_adapter(adapter_name, path).with_factors(a, b))
        # full trainable copies (e.g. classifier heads) are full weights, not deltas: weighted average
        for module in self._wrappers():
            if isinstance(module, TrainableCopies) and adapter_name in module.copies:
                present = [(module.copies[n], w) for n, w in zip(adapters, weights) if n in module.copies]
                total = sum(w for _, w in present)
                if present and total:
                    for key, tensor in module.copies[adapter_name].state_dict().items():
                        tensor.copy_(sum(w * dict(c.state_dict())[key].float() for c, w in present) / total)
