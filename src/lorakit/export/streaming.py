"""The streaming `lorakit merge`: the base is never in memory as a whole, only one output shard.

How the output stays identical to the in-memory merge (:func:`lorakit.export.merge.merged_model`,
which loads the base in fp32, merges every adapter with the layers' own code, then saves):

1. The base model is built from its config with every parameter on the meta device (no memory);
   the adapters are loaded into it for real (their factors live on the CPU: they are small).
2. The LoRA wrappers are unloaded (the module tree is the base's own again) and every parameter is
   replaced by a meta stand-in in the output dtype, so transformers' ``save_pretrained`` plans the
   very same files: tied weights dropped, shards split, index and config written.
3. ``save_pretrained`` hands each shard to safetensors' ``save_file``; here that call first turns
   the shard's meta stand-ins into real tensors: a tensor no adapter touches is read from the
   checkpoint (one tensor, through its own file handle; a 4-bit one dequantised alone), cast
   fp32 then to the output dtype as the in-memory path does. A tensor some wrapper merges into
   (LoRA layer, trainable tokens; all wrappers sharing a tensor form one group) has its module's
   tensors materialised in fp32, the group's merges run with the layers' own ``merge`` in the
   in-memory path's order, the results taken and the stand-ins put back.

Peak memory: one output shard twice (its tensors, then safetensors' serialised bytes) + the
adapters + the largest module group in fp32.

Not streamed (the in-memory path runs instead, with a log line saying why): checkpoints whose keys
transformers renames at load, weight conversions on save, adapters whose load computes tensors
from the base weight (PiSSA / OLoRA inits), and a plan that fails on meta tensors for a model or
variant it doesn't cover (:func:`lorakit.export.merge.merge_to_checkpoint` catches it).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from lorakit.core.layers import LoraLayer
from lorakit.core.model import LoraModel
from lorakit.core.state_dict import adapter_tensor_refs
from lorakit.core.targeting import named_wrappers
from lorakit.core.trainable_tokens import TrainableTokens
from lorakit.export.adapters import attach_adapters
from lorakit.quant.loading import TensorReader, checkpoint_files, empty_weights

logger = logging.getLogger(__name__)


class NotStreamable(Exception):
    """This base/adapter combination can't be merged tensor by tensor (the reason says why)."""


def merge_tensor(layer: LoraLayer, names: list[str]) -> None:
    """ΔW of one wrapper folded into its (materialised) base tensors: the one place the streaming merge
    computes a delta. Today it is the layer's own merge, so every variant merges as in memory."""
    layer.merge(names, safe=True)


class _Slot:
    """One tensor of the model wherever it is held (tied tensors have several places)."""

    def __init__(self, places: list[tuple[nn.Module, str, bool]], key: str | None, real: torch.Tensor | None):
        self.places = places
        self.key = key  # its checkpoint key (None: not in the checkpoint)
        self.real = real  # its value when it is not the checkpoint's (adapter copies, loaded biases), fp32
        self.group: int | None = None  # the wrappers that merge into it
        self.stand_in: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        module, attr, is_param = self.places[0]
        return module._parameters[attr] if is_param else module._buffers[attr]

    def set(self, tensor: torch.Tensor) -> None:
        for module, attr, is_param in self.places:
            if is_param:
                if not isinstance(tensor, nn.Parameter):
                    tensor = nn.Parameter(tensor, requires_grad=False)
                module._parameters[attr] = tensor
            else:
                module._buffers[attr] = tensor


def _places(modules: list[nn.Module]) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """id(tensor) -> every (module, attribute, is_param) holding it."""
    where: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for attr, tensor in module._parameters.items():
                if tensor is not None:
                    where.setdefault(id(tensor), []).append((module, attr, True))
            for attr, tensor in module._buffers.items():
                if tensor is not None:
                    where.setdefault(id(tensor), []).append((module, attr, False))
    return where


def _patched(name: str, wrap: Callable[[Callable], Callable]) -> list[tuple[type, Callable]]:
    """Replace method `name` on LoraLayer and every subclass defining its own; returns what to put back."""
    classes, stack = [], [LoraLayer]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if name in cls.__dict__:
            classes.append((cls, cls.__dict__[name]))
    for cls, original in classes:
        setattr(cls, name, wrap(original))
    return classes


@contextlib.contextmanager
def _adapters_on_cpu() -> Iterator[None]:
    """While adapters are added to a meta-device base: their tensors go to the CPU, and the base weight
    reads as zeros (a broadcast scalar: no memory) for what a variant computes from it at setup, e.g.
    DoRA's magnitude; every such tensor is then overwritten from the adapter file (checked by
    ``_materialise_adapter``: one the file doesn't fill refuses streaming)."""

    def placement(original: Callable) -> Callable:
        def adapter_placement(self) -> dict:
            where = original(self)
            return {**where, "device": torch.device("cpu")} if torch.device(where["device"]).type == "meta" else where
        return adapter_placement

    def weight(original: Callable) -> Callable:
        def base_weight(self) -> torch.Tensor:
            w = original(self)
            return torch.zeros((), dtype=w.dtype).expand(w.shape) if w.is_meta else w
        return base_weight

    restore = _patched("adapter_placement", placement) + _patched("base_weight", weight)
    try:
        yield
    finally:
        for cls, original in restore:
            setattr(cls, original.__name__, original)


class StreamingMerge:
    """Plan (``__init__``: raises NotStreamable before anything is written) then ``save(out)``."""

    def __init__(self, base_dir: Path, model_cls, config, adapter_dirs: list[Path],
                 weights: list[float] | None, out_dtype: str):
        self.reader = TensorReader(checkpoint_files(base_dir))
        self.out_dtype = getattr(torch, out_dtype)
        dense = copy.deepcopy(config)
        if hasattr(dense, "quantization_config"):
            del dense.quantization_config
        with empty_weights():
            skeleton = (model_cls.from_config(dense) if hasattr(model_cls, "from_config")
                        else model_cls._from_config(dense))
        skeleton = skeleton.float().eval()  # the in-memory path merges in fp32 (meta: no memory)
        if getattr(dense, "tie_word_embeddings", False):
            skeleton.tie_weights()
        self._load_generation_config(skeleton, base_dir, hasattr(config, "quantization_config"))
        self.ckpt_key = self._checkpoint_keys(skeleton)  # id(base tensor) -> checkpoint key
        self.layers, self.tokens, self.final = self._load_adapters(skeleton, adapter_dirs, weights)
        if not hasattr(config, "quantization_config"):
            # what from_pretrained leaves on the model (no conversion used: the names matched); save_pretrained
            # then writes the tensors in sorted order, as the in-memory path's checkpoint has them. (The
            # in-memory 4-bit path builds its model from the config, as here, so it keeps module order.)
            self.final._weight_conversions = []
        self._check_conversion()

    # ------------------------------------------------------------------ planning
    @staticmethod
    def _load_generation_config(model: nn.Module, base_dir: Path, quantized: bool) -> None:
        """The generation config from_pretrained gives the in-memory path's model (the 4-bit path builds its
        model from the config, as here, and keeps the one made from it)."""
        if quantized or not (hasattr(model, "adjust_generation_fn") and model.can_generate()):
            return
        model.adjust_generation_fn(None, False, False, base_dir, cache_dir=None, force_download=False, proxies=None,
                                   local_files_only=True, token=None, revision=None, subfolder="",
                                   trust_remote_code=False)

    def _checkpoint_keys(self, skeleton: nn.Module) -> dict[int, str]:
        """id(model tensor) -> its checkpoint key; NotStreamable unless names match one to one."""
        names: dict[str, torch.Tensor] = dict(skeleton.state_dict(keep_vars=True))
        stored = self.reader.dense_keys()
        foreign = [k for k in stored if k not in names]
        if foreign:
            raise NotStreamable(f"checkpoint keys that aren't parameter names (renamed at load), e.g. {foreign[:3]}")
        # ids are only unique while their objects live: keep every tensor whose id is a key here alive
        self._pinned = list(names.values())
        keys: dict[int, str] = {}
        for key in stored:
            keys.setdefault(id(names[key]), key)
        missing = [n for n, t in names.items() if id(t) not in keys and t.is_meta]
        if missing:
            raise NotStreamable(f"parameters the checkpoint lacks (initialised at load), e.g. {missing[:3]}")
        return keys

    def _load_adapters(self, skeleton: nn.Module, adapter_dirs: list[Path], weights: list[float] | None):
        from lorakit.errors import MergeError
        from lorakit.io.adapter_folder import read_adapter_config

        for folder in adapter_dirs:
            init = read_adapter_config(folder).get("init_lora_weights")
            if isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
                raise NotStreamable(f"{folder}: init_lora_weights={init!r} rewrites the base at load")
        plan = self

        class MetaBaseLoraModel(LoraModel):
            """Adapters loaded for real into a meta-device base: meta tensors an adapter brings get memory."""

            def add_adapter(self, adapter_name, config, *args, **kwargs):
                super().add_adapter(adapter_name, config, *args, **kwargs)
                plan._materialise_adapter(self, adapter_name, config)

        with _adapters_on_cpu():
            lora, names = attach_adapters(skeleton, adapter_dirs, weights, lora_class=MetaBaseLoraModel)
        lora.set_adapter(names)
        self.names = names
        layers = list(lora.lora_layers())
        try:
            for layer in layers:  # the in-memory path refuses before anything changes: so do we
                layer.check_mergeable([n for n in names if n in layer.adapters and n not in layer.merged_adapters])
        except ValueError as exc:
            raise MergeError(f"can't fold the adapter: {exc}") from None
        tokens = [m for _, m in named_wrappers(lora.model) if isinstance(m, TrainableTokens)]
        wrappers = [*layers, *tokens]
        final = lora.unload(_merged=True)
        if hasattr(final.config, "quantization_config"):
            del final.config.quantization_config
        self._slots(final, wrappers)
        return layers, tokens, final

    def _materialise_adapter(self, lora: LoraModel, name: str, config) -> None:
        """Give memory to the meta tensors `name` added (DoRA magnitudes, copies...) before its file is copied in.

        A base tensor the adapter file overwrites (bias="all") gets its checkpoint value first, since
        a bias the file lacks keeps the base's. A meta tensor the file doesn't fill would stay
        unknown: NotStreamable.
        """
        refs = {id(t) for t in adapter_tensor_refs(lora.model, name, config.bias).values()}
        for tid, places in _places([lora.model]).items():
            slot = _Slot(places, None, None)
            tensor = slot.get()
            if not tensor.is_meta:
                continue
            if tid in self.ckpt_key:
                if tid in refs:
                    key = self.ckpt_key[tid]
                    self._pinned.append(tensor)
                    slot.set(self.reader.get_dense(key, torch.float32))
                    self.ckpt_key[id(slot.get())] = key
                continue
            if tid not in refs:
                raise NotStreamable(f"adapter {name!r} has a tensor computed from the base at load "
                                    f"({tuple(tensor.shape)}, not in its file)")
            slot.set(torch.zeros(tensor.shape, dtype=tensor.dtype))

    def _slots(self, final: nn.Module, wrappers: list[nn.Module]) -> None:
        """Index every tensor of the output model and of the wrappers; group the wrappers; put in the stand-ins.

        Wrappers that touch a common base tensor form a group, merged together in wrapper order (the
        in-memory path's order: LoRA layers, then trainable tokens).
        """
        slots = {tid: _Slot(places, self.ckpt_key.get(tid), None) for tid, places in _places([final, *wrappers]).items()}
        for slot in slots.values():
            tensor = slot.get()
            if not tensor.is_meta:
                slot.real = tensor.detach()
        self.by_name = {name: slots[id(t)] for name, t in final.state_dict(keep_vars=True).items()}
        self.groups: list[list[nn.Module]] = []
        self.members: list[list[_Slot]] = []
        for wrapper in wrappers:
            mine = [slots[id(p)] for p in wrapper.base.parameters() if slots[id(p)].key is not None]
            joined = sorted({s.group for s in mine if s.group is not None})
            if joined:
                number = joined[0]
                for other in joined[1:]:
                    for slot in self.members[other]:
                        slot.group = number
                    self.members[number].extend(self.members[other])
                    self.groups[number].extend(self.groups[other])
                    self.members[other], self.groups[other] = [], []
            else:
                number = len(self.groups)
                self.groups.append([])
                self.members.append([])
            self.groups[number].append(wrapper)
            for slot in mine:
                if slot.group is None:
                    slot.group = number
                    self.members[number].append(slot)
        order = {id(w): i for i, w in enumerate(wrappers)}
        self.groups = [sorted(g, key=lambda w: order[id(w)]) for g in self.groups]
        self.results: dict[int, torch.Tensor] = {}  # id(slot) -> merged value, until written
        for tid in _places([final]):  # the output model: all meta, in the output dtype, ties kept
            slot = slots[tid]
            tensor = slot.get()
            if isinstance(tensor, nn.Parameter):
                dtype = self.out_dtype if tensor.is_floating_point() else tensor.dtype
                slot.stand_in = nn.Parameter(torch.empty(tensor.shape, dtype=dtype, device="meta"), requires_grad=False)
                slot.set(slot.stand_in)

    def _check_conversion(self) -> None:
        try:
            from transformers.core_model_loading import revert_weight_conversion
        except ImportError:
            return
        state = self.final.state_dict()
        try:
            reverted = revert_weight_conversion(self.final, dict(state))
        except Exception as exc:  # noqa: BLE001 - any failure means: not provably identical
            raise NotStreamable(f"transformers' save-time weight conversion failed on meta tensors ({exc})") from None
        if set(reverted) != set(state):
            raise NotStreamable("transformers converts this model's weights on save")

    # ------------------------------------------------------------------ writing
    def value(self, name: str) -> torch.Tensor:
        """The merged tensor `name` of the output, in the output dtype."""
        slot = self.by_name[name]
        if slot.group is not None:
            if id(slot) not in self.results:
                self._merge_group(slot.group)
            out = self.results.pop(id(slot))
        elif slot.real is not None and not (slot.stand_in is None and slot.key is not None):
            out = slot.real  # (a buffer the checkpoint holds is read from it, as from_pretrained does)
        elif slot.key is not None:
            out = self.reader.get_dense(slot.key, torch.float32)
        else:
            raise NotStreamable(f"{name} has no value: not in the checkpoint, not set by an adapter")
        return out.to(self.out_dtype) if out.is_floating_point() else out

    @torch.no_grad()
    def _merge_group(self, number: int) -> None:
        """Materialise the group's base tensors in fp32, run its merges, keep the results, put the stand-ins back."""
        from lorakit.errors import MergeError

        members = self.members[number]
        for slot in members:
            if slot.real is not None:
                slot.set(slot.real.float().clone())
            else:
                slot.set(self.reader.get_dense(slot.key, torch.float32))
        try:
            for wrapper in self.groups[number]:
                if isinstance(wrapper, TrainableTokens):
                    wrapper.merge(self.names)
                else:
                    merge_tensor(wrapper, self.names)
        except ValueError as exc:  # e.g. NaN/inf in the adapter (safe merge)
            raise MergeError(f"can't fold the adapter: {exc}") from None
        for slot in members:
            self.results[id(slot)] = slot.get().detach()
            slot.set(slot.stand_in)
        for wrapper in self.groups[number]:
            wrapper.merged_adapters.clear()

    def save(self, out: Path, max_shard_size: int) -> None:
        """``save_pretrained`` of the meta model, each shard's tensors made real just before it is written."""
        from transformers import modeling_utils

        real_save = modeling_utils.safe_save_file

        def save_shard(shard: dict[str, torch.Tensor], filename: str, metadata: dict | None = None) -> None:
            real_save({name: self.value(name).contiguous() for name in shard}, filename, metadata=metadata)

        self.final.config.dtype = str(self.out_dtype).removeprefix("torch.")
        modeling_utils.safe_save_file = save_shard
        try:
            self.final.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
        finally:
            modeling_utils.safe_save_file = real_save
