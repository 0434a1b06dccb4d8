"""OLoRA and orthogonal inits, to PEFT 0.21's numbers (``olora_init`` / ``orthogonal_init``).

OLoRA (Büyükakyüz 2024): ``W0 = Q R`` (reduced QR of the fp32 weight), ``B = Q[:, :r]``,
``A = R[:r]``, and the frozen base becomes ``W0 − s·B·A`` (PEFT's order: ``(s·B) @ A``), so the
output is unchanged at init. Like PiSSA, a saved OLoRA folder is a plain LoRA folder whose config
says ``init_lora_weights="olora"``: loading re-runs the init on the original base (same residual)
and then copies the trained factors. The base restore on delete or failed load is PiSSA's.

Orthogonal (PEFT's ``"orthogonal"``): with ``Q`` from the QR of an r×r Gaussian,
``A = (randn(in, r/2) @ Q[0::2]).T / 10`` and ``B = randn(r/2, out).T @ Q[1::2] / 10``, so
``B·A = 0`` exactly in exact arithmetic and the adapter starts near zero. The random draws happen
in PEFT's order, after the two Kaiming draws PEFT's ``nn.Linear`` factors make when they are
created, so one seed gives PEFT's factors.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lorakit.core.layers import LoraAdapter, LoraLayer, LoraLinear
from lorakit.errors import ConfigError, TargetModuleError


def _linear_only(layer: LoraLayer, what: str) -> None:
    if not isinstance(layer, LoraLinear) or layer.fan_in_fan_out:
        raise TargetModuleError(f"{what} init works on nn.Linear-like layers only, not {type(layer.base).__name__}"
                                f"{' (fan_in_fan_out)' if getattr(layer, 'fan_in_fan_out', False) else ''}; "
                                "exclude this layer from target_modules or use init_lora_weights=True")


@torch.no_grad()
def olora_init(layer: LoraLayer, adapter: LoraAdapter) -> None:
    """A, B from the QR of the base weight; the base keeps the residual W0 − s·B·A."""
    _linear_only(layer, "OLoRA")
    weight = layer.base_weight()
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"OLoRA needs a float32/float16/bfloat16 base weight, got {weight.dtype}")
    w = weight.float()
    q, r_mat = torch.linalg.qr(w)
    rank, s = adapter.rank, adapter.scaling
    if rank > min(w.shape):
        raise ConfigError(f"OLoRA rank {rank} exceeds this layer's full rank {min(w.shape)}; lower r")
    adapter.lora_a.copy_(r_mat[:rank].contiguous())
    adapter.lora_b.copy_(q[:, :rank].contiguous())
    # the same bookkeeping as PiSSA (pissa.py), so to_lora_factors and the base restore on delete /
    # failed load treat both inits alike
    adapter.register_buffer("pissa_a0", adapter.lora_a.detach().clone(), persistent=False)
    adapter.register_buffer("pissa_b0", adapter.lora_b.detach().clone(), persistent=False)
    adapter.__dict__["_pissa_original"] = _base_snapshot(layer)
    layer.add_to_base_weight(-((s * adapter.lora_b) @ adapter.lora_a))  # PEFT: W −= (s·B) @ A, in fp32


def _base_snapshot(layer: LoraLayer) -> tuple:
    """The base's own tensors and copies of their values (PiSSA's snapshot format), for the restore."""
    base = layer.base
    own = list(base.named_parameters(recurse=False)) + list(base.named_buffers(recurse=False))
    return {name: (ref, ref.detach().clone()) for name, ref in own}, getattr(base, "quant_state", None)


@torch.no_grad()
def orthogonal_init(layer: LoraLayer, adapter: LoraAdapter) -> None:
    """PEFT's orthogonal init, with its random draws in its order."""
    _linear_only(layer, "Orthogonal")
    rank = adapter.rank
    if rank % 2:
        raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank (PEFT's rule), got r={rank}")
    # the draws PEFT's nn.Linear(in, r) and nn.Linear(r, out) make when they are constructed
    nn.init.kaiming_uniform_(torch.empty(rank, layer.in_features), a=math.sqrt(5))
    nn.init.kaiming_uniform_(torch.empty(layer.out_features, rank), a=math.sqrt(5))
    x = torch.randn(rank, rank)
    q, _ = torch.linalg.qr(x)
    q_odd, q_even = q[0::2, :], q[1::2, :]
    dtype = layer.base_weight().dtype
    lora_a = torch.randn(layer.in_features, rank // 2).mm(q_odd).T / 10.0
    lora_b = torch.randn(rank // 2, layer.out_features).T.mm(q_even) / 10.0
    adapter.lora_a.copy_(lora_a.contiguous().to(dtype))
    adapter.lora_b.copy_(lora_b.contiguous().to(dtype))
