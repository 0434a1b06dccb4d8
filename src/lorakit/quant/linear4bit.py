"""Linear4bit: a frozen Linear whose weight is stored as 4-bit NF4/FP4 codes.

``y = x @ dequant(W)ᵀ + b``, computed in ``compute_dtype``. By default the backward pass
dequantises W again instead of saving it, so a layer holds only its 4-bit weight between forward
and backward, and no gradient is ever computed for W (it has none to receive).

``set_dequant_keep_budget(nbytes)`` trades memory for that second dequantisation: the dense
weights rebuilt in forward are kept for the backward of the same step while their total stays
under the budget (a process-wide count, released as each step's graph is freed). Off by default:
with the compiled dequantisation loop (``lorakit.quant.native``) the second pass costs well under
1% of a layer's matmuls at training batch sizes, and keeping every weight would bring back the
full-precision memory QLoRA exists to avoid (BENCHMARKS.md, QLoRA / NF4).

A dequantised weight that nothing keeps is written into a per-thread scratch buffer sized for the
largest weight seen (``dense_for_step``), not a fresh tensor: a fresh 64 MiB output costs 30-200 ms
of page faults at 4096² on CPU, 10-50× the decoding itself (BENCHMARKS.md, QLoRA / NF4). The buffer
is one weight's worth per thread and dtype; ``free_dequant_scratch()`` returns it.

State-dict layout matches bitsandbytes' ``Linear4bit``: ``weight`` (packed uint8, (n/2, 1)),
``bias``, and ``weight.absmax`` / ``weight.quant_map`` / ``weight.nested_absmax`` /
``weight.nested_quant_map`` / ``weight.quant_state.bitsandbytes__nf4``.

Sharding (FSDP2): the packed codes are a buffer, which ``fully_shard`` leaves whole on every
process. :meth:`Linear4bit.store_as_parameter_` makes them a frozen ``uint8`` parameter instead, so
FSDP2 shards them along dim 0 and all-gathers them (as bytes) before the block runs. FSDP-QLoRA
(FSDP1) had to store the codes in a float dtype (bitsandbytes' ``quant_storage``) because FSDP1
flattens a block into one tensor of one dtype; FSDP2 shards each parameter on its own and gathers
mixed dtypes as bytes, and its mixed-precision casts skip non-float parameters, so uint8 needs no
reinterpretation and can't be cast by mistake. The quant state (absmax, code book) is ~1/30 of
the codes and stays whole on every process. The state-dict keys don't change.
"""

from __future__ import annotations

import threading
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import lorakit.kernels as kernels

from .nf4 import dequantize_4bit, quantize_4bit
from .state import QuantState

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class RequantizationWarning(UserWarning):
    """A 4-bit weight was changed in place: dequantised, updated and quantised again (lossy)."""


_keep = {"budget": 0, "held": 0}
_keep_lock = threading.Lock()


def set_dequant_keep_budget(nbytes: int) -> int:
    """Let up to ``nbytes`` of dequantised 4-bit weights live from forward to backward; returns the old budget.

    0 (the default) recomputes every weight in backward. The count is process-wide and only
    covers weights kept for autograd: each is released when its step's graph is freed.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"the keep budget is a byte count >= 0, got {nbytes!r}")
    with _keep_lock:
        old, _keep["budget"] = _keep["budget"], nbytes
    return old


def dequant_keep_budget() -> tuple[int, int]:
    """(budget, bytes held now) of dequantised weights kept for backward."""
    return _keep["budget"], _keep["held"]


class KeptWeight:
    """A dense weight reserved against the keep budget; the reservation ends when this is freed."""

    __slots__ = ("weight", "nbytes", "__weakref__")

    def __init__(self, weight: torch.Tensor, nbytes: int):
        self.weight, self.nbytes = weight, nbytes

    def __del__(self):
        with _keep_lock:
            _keep["held"] -= self.nbytes


def keep_for_backward(weight: torch.Tensor) -> KeptWeight | None:
    """Reserve ``weight`` against the budget, or None if it doesn't fit (then recompute it)."""
    nbytes = weight.numel() * weight.element_size()
    return KeptWeight(weight, nbytes) if _reserve(nbytes) else None


def _reserve(nbytes: int) -> bool:
    with _keep_lock:
        if _keep["held"] + nbytes > _keep["budget"]:
            return False
        _keep["held"] += nbytes
    return True


_scratch = threading.local()


def free_dequant_scratch() -> None:
    """Drop this thread's scratch buffers for transient dequantised weights (they regrow on demand)."""
    _scratch.__dict__.clear()


def _scratch_view(numel: int, dtype: torch.dtype) -> torch.Tensor:
    buf = _scratch.__dict__.get(dtype)
    if buf is None or buf.numel() < numel:
        _scratch.__dict__.pop(dtype, None)  # free the old one before allocating the larger one
        buf = _scratch.__dict__[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def dense_for_step(layer: Linear4bit, dtype: torch.dtype, keep: bool) -> tuple[torch.Tensor, KeptWeight | None]:
    """The dense (out, in) weight for one matmul, and its reservation when ``keep`` and the budget allows.

    A kept weight is a fresh tensor that lives until its ``KeptWeight`` is freed. Otherwise (CPU) the
    weight is this thread's scratch buffer: valid only until the next transient dequantisation on this
    thread, so use it at once and hold no reference (autograd must not save it).
    """
    numel = layer.out_features * layer.in_features
    if keep and _reserve(numel * dtype.itemsize):
        weight = layer.dequantize(dtype)
        return weight, KeptWeight(weight, numel * dtype.itemsize)
    if layer.weight.device.type != "cpu":  # the CUDA caching allocator reuses blocks: no page faults to save
        return layer.dequantize(dtype), None
    return layer.dequantize(dtype, out=_scratch_view(numel, dtype)), None


class _Dequant4bitMatmul(torch.autograd.Function):
    """x @ Wᵀ with W rebuilt from 4-bit codes in forward, and in backward unless kept (budget)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:
        weight, ctx.kept = dense_for_step(layer, x.dtype, keep=x.requires_grad)  # (out, in); no backward otherwise
        ctx.layer = layer
        return F.linear(x, weight)  # (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        kept, ctx.kept = ctx.kept, None  # release the reservation as soon as it's used
        if not ctx.needs_input_grad[0]:
            return None, None
        weight = kept.weight if kept is not None else dense_for_step(ctx.layer, grad_out.dtype, keep=False)[0]
        return grad_out @ weight.to(grad_out.dtype), None  # (..., in); the packed weight gets no gradient


def _check_compute_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise TypeError(f"compute_dtype must be float32, bfloat16 or float16 (or None), got {dtype}")
    return dtype


class Linear4bit(nn.Module):
    """A frozen 4-bit ``nn.Linear``: same in/out features and bias, weight held as NF4/FP4 codes.

    Build it with ``Linear4bit.from_linear(linear)``, or ``Linear4bit(packed, state, bias)`` from
    already quantised data. ``compute_dtype`` None computes in the weight's original dtype.
    """

    lorakit_linear = True  # LoRA layers wrap it like an nn.Linear (forward / dequantize / add_to_weight_)
    lorakit_4bit = True  # LoRA's fused training path dequantises it once per step (layers/linear.py)

    def __init__(
        self,
        packed: torch.Tensor,
        state: QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D (out, in) weight state, got shape {tuple(state.shape)}")
        self.out_features, self.in_features = int(state.shape[0]), int(state.shape[1])
        self.register_buffer("weight", packed.reshape(-1, 1))  # (ceil(out·in / 2), 1) uint8
        self.quant_state = state
        _check(self.weight, state)
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = _check_compute_dtype(compute_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        quant_type: str = "nf4",
    ) -> Linear4bit:
        """Quantise ``linear.weight`` (fp32/fp16/bf16) blockwise; the bias is kept as is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        packed, state = quantize_4bit(linear.weight.detach(), blocksize, double_quant, quant_type)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(packed, state, bias, compute_dtype)

    # ---- the weight ----

    def store_as_parameter_(self) -> Linear4bit:
        """Hold the packed codes as a frozen uint8 ``nn.Parameter`` (for FSDP2 to shard); idempotent."""
        if "weight" not in self._parameters:
            packed = self._buffers.pop("weight")
            rest = dict(self._parameters)  # weight first, as before: state_dict keeps its key order
            self._parameters.clear()
            self._parameters["weight"] = nn.Parameter(packed, requires_grad=False)
            self._parameters.update(rest)
        return self

    def _set_packed(self, packed: torch.Tensor) -> None:
        """Replace the codes, keeping them a buffer or a frozen parameter as they were."""
        if "weight" in self._parameters:
            self.weight = nn.Parameter(packed, requires_grad=False)
        else:
            self.weight = packed

    @property
    def blocksize(self) -> int:
        return self.quant_state.blocksize

    @property
    def quant_type(self) -> str:
        return self.quant_state.quant_type

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense (out, in) weight, in ``dtype`` (default: the dtype it was quantised from), written
        into ``out`` (contiguous, out·in values of that dtype) if given."""
        if getattr(torch.autograd.profiler, "_is_profiler_enabled", False):  # the C loop is no torch op: name
            with torch.profiler.record_function("lorakit::dequantize_4bit"):  # it for profiles (~20 µs a call,
                weight = dequantize_4bit(self.weight, self.quant_state, dtype, out=out)  # so only then)
        else:
            weight = dequantize_4bit(self.weight, self.quant_state, dtype, out=out)
        return weight.view(self.out_features, self.in_features)

    @torch.no_grad()
    def add_to_weight_(self, delta: torch.Tensor) -> None:
        """W ← quant(dequant(W) + delta): fp32 sum, quantised again with the same settings.

        Lossy (a second rounding to 4 bits), so it warns; export a full-precision merge instead
        when that matters.
        """
        if delta.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"delta must be ({self.out_features}, {self.in_features}), got {tuple(delta.shape)}"
            )
        state = self.quant_state
        merged = self.dequantize(torch.float32) + delta.to(self.weight.device, torch.float32)
        packed, new_state = quantize_4bit(
            merged.to(state.dtype), state.blocksize, state.nested, state.quant_type
        )
        self._set_packed(packed.reshape(-1, 1))
        self.quant_state = new_state
        warnings.warn(
            f"added a delta to a 4-bit weight ({self.out_features}x{self.in_features}): dequantised, "
            f"summed in fp32 and re-quantised to {state.quant_type}, which rounds again",
            RequantizationWarning,
            stacklevel=2,
        )

    # ---- compute ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or self.quant_state.dtype
        if kernels.enabled_for(x, self.weight):  # CUDA + triton: W decoded per tile inside the matmul
            from lorakit.kernels.nf4 import NF4Linear

            bias = None if self.bias is None else self.bias.to(dtype)
            return NF4Linear.apply(x.to(dtype).contiguous(), self.weight, self.quant_state, bias).to(x.dtype)
        out = _Dequant4bitMatmul.apply(x.to(dtype), self)  # (..., out)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        nested = ", double_quant" if self.quant_state.nested else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}{nested}, compute_dtype={self.compute_dtype}"
        )

    # ---- device moves and the bitsandbytes state-dict layout ----

    def _apply(self, fn, recurse: bool = True):
        # .to(dtype) / .half() must not touch the fp32 scales and code books: only follow device moves.
        super()._apply(fn, recurse)
        if self.quant_state.absmax.device != self.weight.device:
            self.quant_state = self.quant_state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, bias
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        entries = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix + "weight.")}
        packed = state_dict.get(prefix + "weight")
        if entries:
            try:
                state = QuantState.from_dict(entries, device=self.weight.device)
                if tuple(state.shape) != (self.out_features, self.in_features):
                    raise ValueError(
                        f"its shape {tuple(state.shape)} isn't ({self.out_features}, {self.in_features})"
                    )
                if packed is not None:
                    _check(packed, state)
            except (ValueError, TypeError, KeyError) as exc:
                error_msgs.append(f"{prefix}weight: can't load the 4-bit quant state: {exc}")
                return
            if packed is not None:
                self._set_packed(packed.detach().to(self.weight.device).reshape(-1, 1).clone())
                self.quant_state = state
            ours = {prefix + "weight"} | {prefix + k for k in entries}
            state_dict = {k: v for k, v in state_dict.items() if k not in ours}
        elif strict and prefix + "weight" in state_dict:
            error_msgs.append(
                f"{prefix}weight: 4-bit layer got a weight without its quant state ({prefix}weight.*)"
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "weight" in missing_keys and entries and packed is not None:
            missing_keys.remove(prefix + "weight")


def _check(packed: torch.Tensor, state: QuantState) -> None:
    state.validate()
    if packed.dtype != torch.uint8 or packed.numel() != (state.numel + 1) // 2:
        raise ValueError(
            f"packed weight ({packed.dtype}, {packed.numel()} values) doesn't match its state "
            f"(shape {tuple(state.shape)} needs {(state.numel + 1) // 2} uint8 bytes)"
        )
