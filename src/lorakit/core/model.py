"""LoraModel: a model with named LoRA adapters injected in place.

    model = lorakit.get_lora_model(base, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    model(input_ids, adapter_names=["a", "b", None])   # one adapter per row, None = base

The wrapped model is ``self.model``; every attribute it has is reachable through the LoraModel
(``model.config``, ``model.generate``, ...). Adapter state lives on the layers; this class only
coordinates them. This module holds the adapter bookkeeping (add / set / delete / enable, what
trains, forward with per-row routing); the rest of LoraModel is mixed in from its own modules:
:mod:`~lorakit.core.model_io` (save / load), :mod:`~lorakit.core.model_merge` (merge / unmerge /
unload), :mod:`~lorakit.core.model_combine` (add_weighted_adapter); :mod:`~lorakit.core.model_build`
holds the functions that build an adapter's targets.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from lorakit.core.config import LoraConfig
from lorakit.core.layers import LoraLayer, wrap_module
from lorakit.core.layers.param import LoraParameter
from lorakit.core.model_build import (
    add_to_layer,
    base_tensors,
    check_same_target_parameters,
    find_param_layer,
    modules_to_save_paths,
    target_shapes,
    with_seq_cls_head,
)
from lorakit.core.model_combine import CombineMixin
from lorakit.core.model_io import AdapterIOMixin
from lorakit.core.model_merge import MergeMixin
from lorakit.core.modules_to_save import TrainableCopies
from lorakit.core.routing import RouteHolder, SlotTable
from lorakit.core.targeting import (
    find_target_modules,
    find_target_parameters,
    iter_wrappers,
    named_wrappers,
    visible_modules,
)
from lorakit.core.trainable_tokens import TrainableTokens, add_trainable_tokens
from lorakit.core.variants import teardown_adapter
from lorakit.errors import AdapterError, ConfigError
from lorakit.io.config_validation import check_adapter_size

_NAME = re.compile(r"[A-Za-z0-9_\-]{1,100}")


def check_adapter_name(name: str) -> str:
    """`name` if it can name an adapter (a folder and a module key), else AdapterError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterError(
            f"invalid adapter name {name!r}: use 1-100 letters, digits, '_' or '-' "
            "(no path separators, dots or '..': the name becomes a folder and a module key)"
        )
    return name


class LoraModel(AdapterIOMixin, MergeMixin, CombineMixin, nn.Module):
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
        config = with_seq_cls_head(config, self.model)
        check_same_target_parameters(config, self.peft_config)
        modules = find_target_modules(self.model, config)
        params = find_target_parameters(self.model, config)
        both = sorted({p for p, _ in params} & set(modules))
        if both:
            raise ConfigError(f"{both[0]!r} is targeted by target_modules and by target_parameters; PEFT nests a "
                              "parameter wrapper inside the LoRA layer there, which lorakit does not: target the "
                              "module or its parameter, not both")
        if self._base_numel is None:
            self._base_numel = sum(t.numel() for t in base_tensors(self.model))
        check_adapter_size(self._base_numel, target_shapes(self.model, modules, params, config))  # before any allocation
        self.peft_config[adapter_name] = config
        self._slots.assign(adapter_name)
        try:
            for path in modules:
                self._add_to_module(path, adapter_name, config)
            for path, param_name in params:
                self._add_to_parameter(path, param_name, adapter_name, config)
            for path in modules_to_save_paths(self.model, config):
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
        add_to_layer(layer, path, name, config)

    def _add_trainable_tokens(self, name: str, config: LoraConfig) -> None:
        """PEFT's trainable_token_indices; a tied output layer follows the input embedding's rows."""
        add_trainable_tokens(self.model, name, config.trainable_token_indices, self._replace, visible_modules)

    def _add_to_parameter(self, path: str, param_name: str, name: str, config: LoraConfig) -> None:
        module = self.model.get_submodule(path) if path else self.model
        key = f"{path}.{param_name}" if path else param_name
        layer = find_param_layer(module, param_name)
        if layer is None:
            layer = LoraParameter(module, param_name)
            self._replace(path, layer)
        add_to_layer(layer, key, name, config)

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

    # ------------------------------------------------------------------ forward
    def forward(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """Call the wrapped model.

        Args:
            *args, **kwargs: passed to the wrapped model as they are.
            adapter_names: one adapter name (or None for the plain base) per batch row, to serve
                several adapters in one batch; default: the active adapters for every row.
        """
        with self._route.rows(adapter_names, self._slots.slots, self._served):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
        """The wrapped model's ``generate``, with `adapter_names` as in :meth:`forward`."""
        with self._route.rows(adapter_names, self._slots.slots, self._served):
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


def get_lora_model(model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default") -> LoraModel:
    """Freeze `model`, inject one LoRA adapter as `config` says, and return the LoraModel.

    With no `config` the LoraModel has no adapters yet (see :class:`LoraModel`).
    """
    return LoraModel(model, config, adapter_name)
