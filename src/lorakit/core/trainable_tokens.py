"""Chosen embedding rows trained in full (PEFT's ``trainable_token_indices`` / TrainableTokens).

An adapter holds the *values* of its rows (not differences): the layer's weight with those rows
replaced, ``W.index_copy(0, ids, values)``, feeds ``F.embedding`` (and, for a tied output layer,
``F.linear``), which is PEFT's operation order, so outputs are bit-identical. The values start as
copies of the base rows, so a new adapter changes nothing until it trains.

File format (PEFT's): the embedding's path + ``adapter_weights.TOKENS_SUFFIX`` holds the values
(shape ``(len(ids), dim)``). A tied output layer (``lm_head.weight is embed_tokens.weight``)
follows the embedding's adapter and saves nothing of its own, as in PEFT.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.core.layers import LoraLayer
from lorakit.core.routing import Routed
from lorakit.errors import AdapterError, ConfigError


class TrainableTokens(Routed, nn.Module):
    """Wraps an nn.Embedding (or, tied to one, its output Linear) with per-adapter replacement rows."""

    def __init__(self, base: nn.Module, tied_to: TrainableTokens | None = None):
        super().__init__()
        if tied_to is None and not isinstance(base, nn.Embedding):
            raise ConfigError(f"trainable_token_indices needs an nn.Embedding, got {type(base).__name__}")
        self.base = base
        self.values = nn.ParameterDict()  # adapter -> (k, dim) rows
        self.indices: dict[str, list[int]] = {}
        self.originals: dict[str, torch.Tensor] = {}  # the base rows, to undo a merge
        # a tied output layer reads the embedding's adapters (kept out of the module tree: no double save)
        self.__dict__["tied_to"] = tied_to
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.routing = None
        for p in base.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ adapters
    def _owner(self) -> TrainableTokens:
        return self.tied_to if self.tied_to is not None else self

    @property
    def adapter_names(self) -> list[str]:
        return list(self._owner().values.keys())

    @torch.no_grad()
    def add_adapter(self, name: str, indices: list[int]) -> None:
        if self.tied_to is not None:
            return
        weight = self.base.weight
        bad = [i for i in indices if not 0 <= i < weight.shape[0]]
        if bad:
            raise ConfigError(f"trainable_token_indices {bad} are outside the embedding's {weight.shape[0]} rows")
        if name in self.values:
            raise AdapterError(f"this embedding already has trainable tokens for adapter {name!r}")
        rows = weight[list(indices)]
        self.values[name] = nn.Parameter(rows.clone())
        self.originals[name] = rows.detach().clone()
        self.indices[name] = list(indices)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into the embedding; unmerge it before deleting")
        if self.tied_to is None:
            del self.values[name]
            self.indices.pop(name, None)
            self.originals.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    # ------------------------------------------------------------------ weights
    def _check_disjoint(self, names: list[str]) -> None:
        owner, seen = self._owner(), set()
        for name in names:
            ids = set(owner.indices[name])
            if seen & ids:
                raise ValueError(f"trainable tokens of adapter {name!r} overlap another active adapter's; "
                                 "only adapters with disjoint token ids can be combined")
            seen |= ids

    def replaced_weight(self, names: list[str]) -> torch.Tensor:
        owner, weight = self._owner(), self.base.weight
        self._check_disjoint(names)
        for name in names:
            index = torch.tensor(owner.indices[name], device=weight.device)
            weight = weight.index_copy(0, index, owner.values[name].to(weight))
        return weight

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (code that reads ``get_input_embeddings().weight`` keeps working)."""
        return self.base.weight

    def _run(self, x: torch.Tensor, weight: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)
            scale = getattr(base, "embed_scale", None)  # scaled embeddings (Gemma) scale in their forward
            return out * scale.to(out.dtype) if isinstance(scale, torch.Tensor) else out
        return F.linear(x, weight)  # PEFT's tied output layer: no bias

    def _live(self, names) -> list[str]:
        present = set(self.adapter_names)
        return [n for n in names if n in present and n not in self.merged_adapters]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base(x, *args, **kwargs)
        if self.routing is not None:
            return self._mixed(x, *args, **kwargs)
        names = self._live(self.active_adapters)
        if not names:
            return self.base(x, *args, **kwargs)
        return self._run(x, self.replaced_weight(names), *args, **kwargs)

    def _mixed(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged_adapters:
            raise RuntimeError("a per-row adapter choice needs unmerged adapters: call unmerge_adapter() first")
        result = self.base(x, *args, **kwargs)
        groups = [(g, n) for g, n in enumerate(self.routing.names) if n in self.adapter_names]
        if not groups:
            return result
        result = result.clone()
        for g, name in groups:
            rows = (self.routing.row_index == g).nonzero().squeeze(1).to(x.device)
            result[rows] = self._run(x[rows], self.replaced_weight([name]), *args, **kwargs).to(result.dtype)
        return result

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, names: list[str]) -> None:
        names = self._live(names)
        if not names or self.tied_to is not None:  # the tied layer shares the embedding's weight
            self.merged_adapters.extend(names)
            return
        self._check_disjoint(self.merged_adapters + names)
        self.base.weight.data = self.replaced_weight(names).detach()
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        owner = self._owner()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if self.tied_to is None:
                index = torch.tensor(owner.indices[name], device=self.base.weight.device)
                self.base.weight.data.index_copy_(0, index, owner.originals[name].to(self.base.weight))

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, tied={self.tied_to is not None}"


def add_trainable_tokens(model: nn.Module, name: str, spec, replace, visible_modules) -> None:
    """Wrap the embedding(s) `spec` names and give adapter `name` its rows; `replace(path, module)`
    swaps a module in. A tied output layer (same weight tensor) gets a wrapper that follows them.

    visible_modules: :func:`lorakit.core.targeting.visible_modules`, passed in because targeting
    imports this module (it must know the wrapper types it does not descend into).
    """

    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for path, ids in token_targets(model, spec, visible_modules(model)):
        module = model.get_submodule(path)
        if isinstance(module, LoraLayer):
            raise ConfigError(f"{path!r} is targeted by LoRA and by trainable_token_indices; PEFT can't "
                              "combine them on one layer either: drop it from target_modules")
        if not isinstance(module, TrainableTokens):
            module = TrainableTokens(module)
            replace(path, module)
        module.add_adapter(name, ids)
        out_now = get_out() if callable(get_out) else None
        tied = not isinstance(out, TrainableTokens) and getattr(out, "weight", None) is module.base.weight
        if out is not None and tied and out_now is out:
            out_path = next(p for p, m in visible_modules(model) if m is out)
            replace(out_path, TrainableTokens(out, tied_to=module))


def token_targets(model: nn.Module, spec, visible) -> list[tuple[str, list[int]]]:
    """(module path, token ids) for trainable_token_indices: a list means the input embedding."""
    modules = dict(visible)
    if isinstance(spec, dict):
        out = []
        for key, ids in spec.items():
            paths = [p for p in modules if p == key or p.endswith("." + key)]
            if not paths:
                raise ConfigError(f"trainable_token_indices names {key!r}, which matches no module of the model")
            out += [(p, list(ids)) for p in paths]
        return out
    get_in = getattr(model, "get_input_embeddings", None)
    embed = get_in() if callable(get_in) else None
    if embed is None:  # PEFT's fallback name
        return token_targets(model, {"embed_tokens": list(spec)}, modules.items())
    for path, module in modules.items():
        if module is embed or (isinstance(module, TrainableTokens) and module.base is embed):
            return [(path, list(spec))]
    raise ConfigError("the model's input embedding was not found among its modules")
