"""Run a model without memory: fake CPU tensors, and a count of the bytes that would be live.

A model is built on the meta device, turned into FakeTensors that claim to be on the CPU (so
kernels are chosen as on a real CPU: e.g. SDPA's flash kernel, not the math fallback), and a
training step runs on them while :class:`LiveMemory` adds up every new tensor storage and
subtracts it when the storage is freed:  peak = max_t Σ_{storages alive at t} nbytes.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CPU = torch.device("cpu")


def fake_cpu_module(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Replace every meta parameter/buffer by a FakeTensor on "cpu", in place; ties stay tied."""
    converter = mode.fake_tensor_converter
    memo: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None:
                continue
            if id(param) not in memo:
                fake = converter.from_meta_and_device(mode, param.data, CPU)
                memo[id(param)] = nn.Parameter(fake, requires_grad=param.requires_grad)
            sub._parameters[name] = memo[id(param)]  # type: ignore[assignment]
        for name, buf in list(sub._buffers.items()):
            if buf is None:
                continue
            if id(buf) not in memo:
                memo[id(buf)] = converter.from_meta_and_device(mode, buf, CPU)
            sub._buffers[name] = memo[id(buf)]
    return module


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class LiveMemory(TorchDispatchMode):
    """Bytes of tensor storage created inside this mode that are still alive, and their peak.

    Storages that existed before (parameters, buffers, inputs) are passed as `existing` and never
    counted. Views and in-place results share a storage already seen, so count nothing.
    """

    def __init__(self, existing: list[torch.Tensor] | tuple[torch.Tensor, ...] = ()):
        super().__init__()
        self._seen: set[int] = {_storage_key(t) for t in existing}
        self._refs: dict[int, weakref.ref] = {}
        self.live = 0  # bytes
        self.peak = 0  # bytes

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)
        self._seen.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen.add(key)
            self._refs[key] = weakref.ref(storage, lambda _r, k=key, n=nbytes: self._freed(k, n))
            self.live += nbytes
        self.peak = max(self.peak, self.live)
        return out
