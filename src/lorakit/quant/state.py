"""QuantState: everything besides the packed codes needed to dequantise a 4-bit tensor.

Field for field the same as bitsandbytes' ``QuantState``, and ``as_dict`` / ``from_dict`` write and
read the same state-dict entries (``absmax``, ``quant_map``, ``nested_absmax``,
``nested_quant_map`` and the JSON blob ``quant_state.bitsandbytes__nf4``), so checkpoints move
between the two libraries unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from .blockwise8 import dequantize_blockwise
from .codes import QUANT_TYPES, _code

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # absmax values per 8-bit block under double quantisation (fixed by bnb)
_QS_PREFIX = "quant_state.bitsandbytes__"


def check_blocksize(blocksize: Any) -> int:
    """Return ``blocksize`` if it is a power of two in [32, 4096], else raise ValueError."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(
            f"blocksize must be a power of two between 32 and 4096 (one of {BLOCKSIZES}), got "
            f"{blocksize!r}; 64 is the QLoRA default"
        )
    return blocksize


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the quant_state entry; the checkpoint is corrupt")
    return dtype


@dataclass
class NestedState:
    """The 8-bit blockwise quantisation of the per-block scales (double quantisation)."""

    absmax: torch.Tensor  # (ceil(n_blocks / 256),) float32: max |scale - offset| per 256 scales
    code: torch.Tensor  # (256,) float32: the signed dynamic map
    blocksize: int = NESTED_BLOCKSIZE  # scales per 8-bit block
    dtype: torch.dtype = torch.float32  # dtype of the scales it reconstructs


@dataclass
class QuantState:
    """How to turn packed 4-bit codes back into a tensor: ``w = code[q] * absmax[block]``.

    With double quantisation (``state2`` set) the scales are stored as 8-bit codes too:
    ``absmax = state2.code[absmax_u8] * state2.absmax[block // 256] + offset``.
    """

    absmax: torch.Tensor  # (n_blocks,) float32 scales, or uint8 codes of them when nested
    shape: torch.Size  # shape of the quantised tensor
    dtype: torch.dtype  # dtype it had, and the dtype dequantisation returns
    blocksize: int  # values sharing one scale
    quant_type: str = "nf4"  # "nf4" or "fp4"
    code: torch.Tensor | None = None  # (16,) float32 code book
    offset: torch.Tensor | None = None  # () float32 mean of the fp32 scales (nested only)
    state2: NestedState | None = None  # the 8-bit quantisation of the scales (nested only)

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def code_table(self) -> torch.Tensor:
        """The (16,) float32 value of each 4-bit code of ``quant_type`` (shared, read-only)."""
        return _code(self.quant_type)

    def block_scales(self) -> torch.Tensor:
        """The (n_blocks,) float32 scales, undoing the double quantisation if any."""
        if self.state2 is None:
            return self.absmax.float()
        scales = dequantize_blockwise(self.absmax, self.state2.absmax, self.state2.code, self.state2.blocksize)
        return scales.add_(self.offset)

    def nbytes(self) -> int:
        """Bytes of tensor storage this state holds (scales, code books, offset)."""
        tensors = [self.absmax, self.code, self.offset]
        if self.state2 is not None:
            tensors += [self.state2.absmax, self.state2.code]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device: torch.device | str) -> QuantState:
        """A copy with every tensor on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        state2 = None
        if self.state2 is not None:
            state2 = replace(self.state2, absmax=move(self.state2.absmax), code=move(self.state2.code))
        return replace(
            self, absmax=move(self.absmax), code=move(self.code), offset=move(self.offset), state2=state2
        )

    def validate(self) -> None:
        """Raise ValueError if the fields contradict each other (sizes, dtypes, names)."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        check_blocksize(self.blocksize)
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"state dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if self.code is None or self.code.numel() != 16:
            raise ValueError("state code must be the 16-entry code book of its quant_type")
        if self.absmax.numel() != self.n_blocks:
            raise ValueError(
                f"state holds {self.absmax.numel()} block scales but shape {tuple(self.shape)} with "
                f"blocksize {self.blocksize} needs {self.n_blocks}; the state belongs to another tensor"
            )
        if self.state2 is None:
            if self.absmax.dtype != torch.float32:
                raise ValueError(f"un-nested absmax must be float32, got {self.absmax.dtype}")
            return
        if self.absmax.dtype != torch.uint8:
            raise ValueError(f"nested absmax must hold uint8 codes, got {self.absmax.dtype}")
        if self.offset is None:
            raise ValueError("a nested state needs the offset (mean of the fp32 scales)")
        n2 = -(-self.n_blocks // self.state2.blocksize)
        if self.state2.absmax.numel() != n2 or self.state2.code.numel() != 256:
            raise ValueError(
                f"nested state has {self.state2.absmax.numel()} scales / {self.state2.code.numel()}-entry "
                f"code, expected {n2} / 256 for {self.n_blocks} blocks"
            )

    # ---- state-dict format (bitsandbytes / transformers) ----

    def as_dict(self, packed: bool = True) -> dict[str, Any]:
        """The state as bnb writes it; ``packed=True`` folds the non-tensor fields into one uint8
        JSON tensor under ``quant_state.bitsandbytes__<quant_type>`` (safetensors-friendly)."""
        meta: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        tensors: dict[str, torch.Tensor] = {"absmax": self.absmax, "quant_map": self.code}
        if self.state2 is not None:
            tensors["nested_absmax"] = self.state2.absmax
            tensors["nested_quant_map"] = self.state2.code.clone()  # unshared, as safetensors wants
            meta.update(
                nested_blocksize=self.state2.blocksize,
                nested_dtype=dtype_name(self.state2.dtype),
                nested_offset=float(self.offset.item()),
            )
        if not packed:
            return {**tensors, **meta}
        blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return {**tensors, _QS_PREFIX + self.quant_type: blob}

    @classmethod
    def from_dict(cls, entries: dict[str, Any], device: torch.device | str = "cpu") -> QuantState:
        """Rebuild a state from ``as_dict`` output (keys may carry a ``weight.`` style prefix)."""
        entries = dict(entries)
        blobs = [k for k in entries if "quant_state." in k]
        meta: dict[str, Any] = {}
        if blobs:
            if len(blobs) != 1:
                raise ValueError(f"expected exactly one quant_state entry, found {blobs}")
            key = blobs[0]
            suffix = key.split("quant_state.")[-1]
            if suffix not in tuple("bitsandbytes__" + q for q in QUANT_TYPES):
                raise ValueError(
                    f"quant_state entry {key!r} must end in bitsandbytes__nf4 or bitsandbytes__fp4"
                )
            blob = entries.pop(key)
            meta = json.loads(bytes(blob.to("cpu", torch.uint8).tolist()).decode("utf-8"))
        stripped = {k.rsplit(".", 1)[-1]: v for k, v in entries.items()}
        stripped.update(meta)
        missing = {"absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape"} - stripped.keys()
        if missing:
            raise ValueError(f"quantised entry is missing {sorted(missing)}; is this a 4-bit checkpoint?")
        state2 = offset = None
        if "nested_absmax" in stripped:
            offset = torch.tensor(float(stripped["nested_offset"]), dtype=torch.float32, device=device)
            state2 = NestedState(
                absmax=stripped["nested_absmax"].to(device),
                code=stripped["nested_quant_map"].to(device),
                blocksize=int(stripped.get("nested_blocksize", NESTED_BLOCKSIZE)),
                dtype=_dtype_from_name(stripped.get("nested_dtype", "float32")),
            )
        state = cls(
            absmax=stripped["absmax"].to(device),
            shape=torch.Size(stripped["shape"]),
            dtype=_dtype_from_name(stripped["dtype"]),
            blocksize=int(stripped["blocksize"]),
            quant_type=str(stripped["quant_type"]),
            code=stripped["quant_map"].to(device),
            offset=offset,
            state2=state2,
        )
        state.validate()
        return state
