"""LoraModel: a model with named LoRA adapters injected in place.

    model = lorakit.get_lora_model(base, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    model(input_ids, adapter_names=["a", "b", None])   # one adapter per row, None = base

The wrapped model is ``self.model``; every attribute it has is reachable through the LoraModel
(``model.config``, ``model.generate``, ...). Adapter state lives on the layers; this class only
coordinates them.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from lorakit.core import arithmetic
from lorakit.core.config import LoraConfig
from lorakit.core.layers import LoraAdapter, LoraLayer, wrap_module
from lorakit.core.layers.param import LoraParameter
from lorakit.core.modules_to_save import TrainableCopies
from lorakit.core.routing import RouteHolder, RowRouting, SlotTable
from lorakit.core.state_dict import get_adapter_state_dict, load_adapter_state_dict
from lorakit.core.targeting import (
    SEQ_CLS_HEAD_NAMES,
    find_target_modules,
    find_target_parameters,
    iter_wrappers,
    named_wrappers,
    visible_modules,
)
from lorakit.core.trainable_tokens import TrainableTokens, add_trainable_tokens
from lorakit.core.variants import DoraAdapter, adapter_class, prepare_load, setup_adapter, teardown_adapter
from lorakit.errors import AdapterError, AdapterLoadError, ConfigError
from lorakit.io import read_adapter_folder, write_adapter_folder
from lorakit.io.config_validation import check_adapter_size, validate_adapter_config, validate_adapter_tensors

_NAME = re.compile(r"[A-Za-z0-9_\-]{1,100}")


def check_adapter_name(name: str) -> str:
    """`name` if it can name an adapter (a folder and a module key), else AdapterError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1-100 letters, digits, '_' or '-' "
            "(no path separators, dots or '..': the name becomes a folder and a module key)"
        )
    return name


class LoraModel(nn.Module):
    """A frozen base model with named LoRA adapters injected in place (PEFT's PeftModel, for LoRA).

    Args:
        model: the base model (any ``nn.Module``; transformers models keep ``generate`` and
            ``config``). Its parameters are frozen; only adapter tensors train.
        config: the first adapter's :class:`~lorakit.core.config.LoraConfig` (or a variant's
            config such as ``AdaLoraConfig``). None builds a LoraModel with no adapters: it runs the
            base model bit for bit until :meth:`add_adapter` / :meth:`load_adapter` wraps the targets
            (a server holds one from the start and loads adapters as requests name them).
        adapter_name: the first adapter's name (with `config`); it becomes the active adapter.

    Each adapter is stored on the layers; on disk it is a PEFT-format folder whose tensors are
    named by :mod:`lorakit.core.adapter_weights`.
    """

    def __init__(self, model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        self._attach(model)
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    def _attach(self, model: nn.Module) -> None:
        """Hold `model` frozen, with no adapters yet."""
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapters: list[str] = []
        self._disabled = False
        self._base_numel: int | None = None  # the base's size, for the adapter-size bound (counted once)
        self._route = RouteHolder()  # shared by every wrapper: routing a forward is one assignment
        self._slots = SlotTable()  # adapter -> row slot in the layers' factor pools (core/routing.py)
        self._served: dict = {}  # name -> ServedAdapter: pool-only adapters (core/pooled.py)
        for p in model.parameters():
            p.requires_grad_(False)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ------------------------------------------------------------------ layers
    def lora_layers(self) -> Iterator[LoraLayer]:
        """Every LoRA layer (wrapped module or raw parameter) in the model, in module order."""
        yield from (m for m in iter_wrappers(self.model) if isinstance(m, LoraLayer))

    def _wrappers(self) -> Iterator[LoraLayer | TrainableCopies | TrainableTokens]:
        yield from iter_wrappers(self.model)

    def _replace(self, path: str, new: nn.Module) -> None:
        parent_name, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Inject a new adapter (not activated: call set_adapter). Nothing changes if it fails.

        Args:
            adapter_name: 1-100 letters, digits, '_' or '-'; unique in this model.
            config: which modules / raw parameters to adapt and how (rank, alpha, variant, ...).
                Every target, module or raw parameter, is built by the same path
                (``adapter_class`` + ``setup_adapter``): a variant that can't act on a target is
                refused there, never silently turned into plain LoRA.
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterError(f"an adapter named {adapter_name!r} exists already; delete it or pick another name")
        if not isinstance(config, LoraConfig):
            raise ConfigError(f"config must be a LoraConfig, got {type(config).__name__}")
        config = _with_seq_cls_head(config, self.model)
        _check_same_target_parameters(config, self.peft_config)
        modules = find_target_modules(self.model, config)
        params = find_target_parameters(self.model, config)
        both = sorted({p for p, _ in params} & set(modules))
        if both:
            raise ConfigError(f"{both[0]!r} is targeted by target_modules and by target_parameters; PEFT nests a "
                              "parameter wrapper inside the LoRA layer there, which lorakit does not: target the "
                              "module or its parameter, not both")
        if self._base_numel is None:
            self._base_numel = sum(t.numel() for t in _base_tensors(self.model))
        check_adapter_size(self._base_numel, self._target_shapes(modules, params, config))  # before any allocation
        self.peft_config[adapter_name] = config
        self._slots.assign(adapter_name)
        try:
            for path in modules:
                self._add_to_module(path, adapter_name, config)
            for path, param_name in params:
                self._add_to_parameter(path, param_name, adapter_name, config)
            for path in self._modules_to_save_paths(config):
                module = self.model.get_submodule(path)
                if not isinstance(module, TrainableCopies):
                    module = TrainableCopies(module)
                    self._replace(path, module)
                module.add_adapter(adapter_name)
            if config.trainable_token_indices is not None:
                self._add_trainable_tokens(adapter_name, config)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        self._sync_wrappers()
        self._update_trainable(only=adapter_name)
        if not self.active_adapters:  # the first adapter of an empty model is the active one, as at construction
            self.set_adapter(adapter_name)

    def _target_shapes(self, modules: list[str], params: list[tuple[str, str]], config: LoraConfig):
        """(path, rank, fan_in, fan_out) of every target, for the size bound."""
        for path in modules:
            module = self.model.get_submodule(path)
            while isinstance(module, LoraLayer) and not isinstance(module, LoraParameter):
                module = module.base
            if hasattr(module, "in_features") and hasattr(module, "out_features"):
                fan_in, fan_out = int(module.in_features), int(module.out_features)
            else:
                weight = getattr(module, "weight", None)
                shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else (0, 0)
                fan_in, fan_out = int(torch.Size(shape[1:]).numel()), int(shape[0])
            yield path, config.rank_for(path), fan_in, fan_out
        for path, param_name in params:
            key = f"{path}.{param_name}" if path else param_name
            weight = self.model.get_parameter(key) if key in dict(self.model.named_parameters()) else None
            shape = tuple(weight.shape) if weight is not None and weight.dim() >= 2 else (0, 0)
            yield key, config.rank_for(key), int(torch.Size(shape[1:]).numel()), int(shape[0])

    def _sync_wrappers(self) -> None:
        """Newly wrapped layers take the model's current active set and enabled state."""
        for module in self._wrappers():
            module.active_adapters = list(self.active_adapters)
            module.disabled = self._disabled
            module.share_route(self._route)

    def _add_to_module(self, path: str, name: str, config: LoraConfig) -> None:
        layer = self.model.get_submodule(path)
        if not isinstance(layer, LoraLayer):
            layer = wrap_module(layer)
            self._replace(path, layer)
        if config.fan_in_fan_out and hasattr(layer, "fan_in_fan_out"):
            layer.fan_in_fan_out = True
        _add_to_layer(layer, path, name, config)

    def _add_trainable_tokens(self, name: str, config: LoraConfig) -> None:
        """PEFT's trainable_token_indices; a tied output layer follows the input embedding's rows."""
        add_trainable_tokens(self.model, name, config.trainable_token_indices, self._replace, visible_modules)

    def _add_to_parameter(self, path: str, param_name: str, name: str, config: LoraConfig) -> None:
        module = self.model.get_submodule(path) if path else self.model
        key = f"{path}.{param_name}" if path else param_name
        layer = _find_param_layer(module, param_name)
        if layer is None:
            layer = LoraParameter(module, param_name)
            self._replace(path, layer)
        _add_to_layer(layer, key, name, config)

    def _modules_to_save_paths(self, config: LoraConfig) -> list[str]:
        wanted = config.modules_to_save or []
        paths = []
        for path, _ in visible_modules(self.model):
            if any(path == w or path.endswith("." + w) for w in wanted):
                paths.append(path)
        missing = [w for w in wanted if not any(p == w or p.endswith("." + w) for p in paths)]
        # PEFT lists both usual head names for SEQ_CLS adapters; a model has only one of them
        missing = [w for w in missing if not (config.task_type == "SEQ_CLS" and w in SEQ_CLS_HEAD_NAMES)]
        if missing:
            raise ConfigError(f"modules_to_save {missing} matched no module of the model")
        return paths

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; layers left without adapters turn back into the base module.

        Args:
            adapter_name: an adapter of this model (unmerge it first if it is merged).
        """
        if adapter_name not in self.peft_config:
            raise AdapterError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        for module in list(self._wrappers()):
            if isinstance(module, LoraLayer) and adapter_name in module.adapters:
                if adapter_name not in module.merged_adapters:
                    teardown_adapter(module, module.adapters[adapter_name])  # PiSSA: base back bit for bit
                module.delete_adapter(adapter_name)
            elif isinstance(module, TrainableCopies) and adapter_name in module.copies:
                module.delete_adapter(adapter_name)
            elif isinstance(module, TrainableTokens) and module.tied_to is None and adapter_name in module.values:
                module.delete_adapter(adapter_name)
        self._unwrap_empty()
        del self.peft_config[adapter_name]
        self._slots.release(adapter_name)
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        if not self.active_adapters and self.peft_config:
            self.set_adapter(next(iter(self.peft_config)))

    def _unwrap_empty(self) -> None:
        changed = True
        while changed:  # nested parameter wrappers unwrap one level per pass
            changed = False
            for path, module in list(named_wrappers(self.model)):
                empty_lora = (isinstance(module, LoraLayer) and not module.adapters and not module.merged_adapters
                              and not (module.factor_pool is not None and module.factor_pool.owner))
                empty_copies = isinstance(module, TrainableCopies) and not module.copies
                empty_tokens = isinstance(module, TrainableTokens) and not module.adapter_names
                if empty_lora or empty_copies or empty_tokens:
                    self._replace(path, module.original if empty_copies else module.base)
                    changed = True
                    break

    def set_adapter(self, adapter_names: str | Sequence[str]) -> None:
        """Make these adapters the active ones (several are summed) and the trainable ones.

        Args:
            adapter_names: one name or a list of names; each must exist. Adapters loaded for
                inference (``inference_mode``) stay frozen.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterError(f"no adapter named {unknown}; adapters: {sorted(self.peft_config)}")
        self.active_adapters = names
        for module in self._wrappers():
            module.active_adapters = list(names)
        self._update_trainable()

    @property
    def active_adapter(self) -> str:
        """The first active adapter's name (PEFT's attribute)."""
        if not self.active_adapters:
            raise AdapterError("no adapter is active (the model has none yet): add_adapter or load_adapter first")
        return self.active_adapters[0]

    def _update_trainable(self, only: str | None = None) -> None:
        """Only the active adapters' factors (and their copies) train, unless loaded for inference.

        `only` restricts the update to one adapter's tensors (a newly added one), so adding the
        k-th adapter costs the same as adding the first.
        """
        trainable = {n for n in self.active_adapters if not self.peft_config[n].inference_mode}
        for module in self._wrappers():
            if isinstance(module, TrainableTokens):
                if module.tied_to is None:
                    for name, values in module.values.items():
                        if only is None or name == only:
                            values.requires_grad_(name in trainable)
                continue
            groups = module.adapters if isinstance(module, LoraLayer) else module.copies
            items = [(only, groups[only])] if only is not None and only in groups else (
                [] if only is not None else groups.items())
            for name, sub in items:
                for p in sub.parameters():
                    p.requires_grad_(name in trainable)
        for name in trainable if only is None or only in trainable else ():
            bias = self.peft_config[name].bias
            if bias == "all":
                for key, p in self.model.named_parameters():
                    if (key == "bias" or key.endswith(".bias")) and ".adapters." not in key:  # PEFT's rule
                        p.requires_grad_(True)
            elif bias == "lora_only":
                for layer in self.lora_layers():
                    if name in layer.adapters and getattr(layer.base, "bias", None) is not None:
                        layer.base.bias.requires_grad_(True)

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

    # ------------------------------------------------------------------ enable / disable
    @contextlib.contextmanager
    def _disabled_ctx(self) -> Iterator[None]:
        try:
            yield
        finally:
            self.enable_adapters()

    def disable_adapters(self) -> contextlib.AbstractContextManager:
        """Run the plain base model (merged adapters are unmerged on the next forward).

        Also a context manager: ``with model.disable_adapters(): ...`` enables them again on exit.
        """
        self._set_disabled(True)
        return self._disabled_ctx()

    def enable_adapters(self) -> None:
        """Undo :meth:`disable_adapters`: the active adapters apply again."""
        self._set_disabled(False)

    def _set_disabled(self, value: bool) -> None:
        self._disabled = value
        for module in self._wrappers():
            module.disabled = value

    # ------------------------------------------------------------------ merge
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = True) -> None:
        """W += ΔW in every layer for these adapters (fp32 arithmetic, cast back). Idempotent.

        Args:
            adapter_names: the adapters to merge (default: the active ones).
            safe_merge: check every delta is finite before changing a weight.

        A layer that can't merge (e.g. a grouped conv) raises MergeError before any layer changes.
        """
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        layers = list(self.lora_layers())
        for layer in layers:  # every layer first, so a refusal leaves no layer half merged
            layer.check_mergeable([n for n in names if n in layer.adapters and n not in layer.merged_adapters])
        for layer in layers:
            layer.merge(names, safe=safe_merge)
        for module in self._wrappers():
            if isinstance(module, TrainableTokens):
                module.merge(names)

    def unmerge_adapter(self) -> None:
        """Subtract every merged delta again, newest first, restoring the base weights."""
        for layer in self.lora_layers():
            layer.unmerge()
        for module in self._wrappers():
            if isinstance(module, TrainableTokens):
                module.unmerge()

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = True) -> nn.Module:
        """Merge, then return the plain base model (its own class, no LoRA modules left).

        Args:
            adapter_names: the adapters to merge (default: the active ones).
            safe_merge: as in :meth:`merge_adapter`.
        """
        self.merge_adapter(adapter_names, safe_merge)
        return self.unload(_merged=True)

    def unload(self, _merged: bool = False) -> nn.Module:
        """Remove every LoRA module and return the base model (merged weights stay merged).

        Args:
            _merged: internal (merge_and_unload): keep the active modules_to_save copies.
        """
        for path, module in sorted(named_wrappers(self.model), key=lambda kv: -kv[0].count(".")):
            if isinstance(module, (LoraLayer, TrainableTokens)):
                self._replace(path, module.base)
            elif isinstance(module, TrainableCopies):
                self._replace(path, module.active_copy() if _merged else module.original)
        self.peft_config.clear()
        self._served.clear()
        self._slots.clear()
        return self.model

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def _routing(self, adapter_names: Sequence[str | None] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        unknown = sorted({n for n in adapter_names if n is not None and n not in self._slots.slots})
        if unknown:
            raise AdapterError(f"adapter_names has unknown adapters {unknown}; adapters: "
                               f"{sorted(self._slots.slots)}")
        # one shared holder read by every wrapper: O(1) per forward, not a walk over the wrappers
        self._route.current = RowRouting(adapter_names, self._slots.slots, self._served)
        try:
            yield
        finally:
            self._route.current = None

    def forward(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """Call the wrapped model.

        Args:
            *args, **kwargs: passed to the wrapped model as they are.
            adapter_names: one adapter name (or None for the plain base) per batch row, to serve
                several adapters in one batch; default: the active adapters for every row.
        """
        with self._routing(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """The wrapped model's ``generate``, with `adapter_names` as in :meth:`forward`."""
        with self._routing(adapter_names):
            return self.model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ reporting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; a 4-bit base counts its unpacked weights."""
        trainable = total = 0
        for p in self.model.parameters():
            n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # two 4-bit values per byte
            total += n
            trainable += n if p.requires_grad else 0
        for module in self.model.modules():  # 4-bit bases keep their packed weight as a buffer
            if getattr(module, "lorakit_linear", False) and not isinstance(getattr(module, "weight", None),
                                                                            nn.Parameter):
                total += module.in_features * module.out_features
        return trainable, total

    def trainable_parameters_report(self) -> str:
        """PEFT's one-line summary of trainable vs frozen parameters."""
        trainable, total = self.get_nb_trainable_parameters()
        frozen = total - trainable
        reduction = 100.0 * (1 - trainable / frozen) if frozen else 0.0
        return (
            f"trainable params: {trainable:,} || frozen params: {frozen:,} || all params: {total:,} || "
            f"trainable%: {100.0 * trainable / max(total, 1):.4f} || vs full fine-tuning: −{reduction:.1f}%"
        )

    def print_trainable_parameters(self) -> str:
        """Print :meth:`trainable_parameters_report` (PEFT's API; the one print in the library) and return it."""
        report = self.trainable_parameters_report()
        print(report)
        return report

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike,
                        selected_adapters: Iterable[str] | None = None) -> None:
        """One PEFT-format folder per adapter ("default" at the top, others in a subfolder).

        Args:
            save_directory: the folder to write (created; each file written atomically).
            selected_adapters: the adapters to save (default: all).

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
            write_adapter_folder(folder, data, get_adapter_state_dict(self.model, name, config.bias))

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, root: str | os.PathLike | None = None) -> LoraModel:
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
        config, tensors = _read_config_and_tensors(adapter_dir, is_trainable, root)
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
        config, tensors = _read_config_and_tensors(adapter_dir, is_trainable, root)
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
        config, tensors = _read_config_and_tensors(adapter_dir, is_trainable=True)
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
        flags = [(p, p.requires_grad) for p in _base_tensors(self.model, buffers=False)]
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


def _base_tensors(model: nn.Module, buffers: bool = True) -> Iterator[torch.Tensor]:
    """The model's parameters (and buffers) that belong to no adapter: base weights, also inside LoRA
    wrappers, and trainable copies / tokens. Adapter internals are never walked, so the cost doesn't
    grow with the number of adapters loaded."""
    for _, module in visible_modules(model):
        if isinstance(module, LoraLayer):
            owner, recurse = module.base, True
        elif isinstance(module, (TrainableCopies, TrainableTokens)):
            owner, recurse = module, True
        else:
            owner, recurse = module, False
        yield from owner.parameters(recurse=recurse)
        if buffers:
            yield from owner.buffers(recurse=recurse)


def get_lora_model(model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default") -> LoraModel:
    """Freeze `model`, inject one LoRA adapter as `config` says, and return the LoraModel.

    With no `config` the LoraModel has no adapters yet (see :class:`LoraModel`).
    """
    return LoraModel(model, config, adapter_name)


def _read_config_and_tensors(adapter_dir, is_trainable: bool,
                             root=None) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
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
    from lorakit.core.variants import config_class_for_peft_type

    return config_class_for_peft_type(peft_type).from_dict(data)


def _check_same_target_parameters(config: LoraConfig, others: dict[str, LoraConfig]) -> None:
    """PEFT's rule: every adapter with target_parameters targets the same set (the nesting of the
    parameter wrappers, and so the saved key names, depends on that set)."""
    if not config.target_parameters:
        return
    wanted = set(config.target_parameters)
    for name, other in others.items():
        if other.target_parameters and set(other.target_parameters) != wanted:
            raise ConfigError(f"adapter {name!r} targets the parameters {sorted(other.target_parameters)}, this one "
                              f"{sorted(wanted)}; adapters with target_parameters must all target the same set "
                              "(PEFT's rule, which keeps their saved key names valid)")


def _add_to_layer(layer: LoraLayer, path: str, name: str, config: LoraConfig) -> LoraAdapter:
    """The one construction path of an adapter on a wrapped module or raw parameter.

    The config picks the class (a variant) and its scaling rule; ``setup_adapter`` then creates the
    variant's tensors and runs inits that need the base weight. A variant that can't act on this
    layer kind (e.g. DoRA on a raw parameter) raises there, never degrades to plain LoRA.
    """
    adapter = layer.add_adapter(name, config.rank_for(path), config.alpha_for(path), config.lora_dropout,
                                config.init_lora_weights, adapter_class(config, layer), config.scaling_rule(),
                                config.scale_rank_for(path))
    setup_adapter(layer, adapter, config)  # variant tensors (DoRA magnitude, ...) and inits (PiSSA)
    return adapter


def _find_param_layer(module: nn.Module, param_name: str) -> LoraParameter | None:
    while isinstance(module, LoraParameter):
        if module.param_name == param_name:
            return module
        module = module.base
    return None


def _with_seq_cls_head(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """PEFT's rule: a SEQ_CLS adapter trains and saves the classifier head in full."""
    if config.task_type != "SEQ_CLS":
        return config
    names = dict(model.named_children())
    heads = [n for n in SEQ_CLS_HEAD_NAMES if n in names]
    wanted = list(config.modules_to_save or [])
    extra = [h for h in heads if h not in wanted]
    return config.replace(modules_to_save=wanted + extra) if extra else config
