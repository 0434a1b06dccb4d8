"""PiSSA init (Meng et al. 2024): the adapter starts as the top-r singular part of W0.

    W0 = U S Vᵀ,   A = √(S_r/s) · V_rᵀ,   B = U_r · √(S_r/s),   frozen base ← W0 − s·B·A

so the model's output is unchanged at init while the adapter trains the principal directions.
``init_lora_weights="pissa"`` uses a full SVD; ``"pissa_niter_K"`` uses ``torch.svd_lowrank``
with K subspace iterations (fast, randomised: its residual depends on the torch RNG). These are
PEFT's exact conventions (``pissa_init`` in peft/tuners/lora/layer.py), including its file format:
the folder is a plain LoRA folder whose config says ``init_lora_weights="pissa"``, and loading
it re-runs the init on the *original* base (same residual) before the trained factors are copied.

Deleting a PiSSA adapter (or a failed load of one) puts the base back bit for bit: the init keeps
the layer's original weight (one copy per targeted layer; for a 4-bit base the packed weight and
its quant state) and :func:`restore_base` writes it back — PEFT leaves the residual in the base,
which silently changes every other adapter and the base outputs. :func:`to_lora_factors` gives the
equivalent rank-2r plain LoRA relative to the original W0 (PEFT's
``path_initial_model_for_weight_conversion``), which needs no change to the base.
"""

from __future__ import annotations

import re

import torch

from lorakit.core.layers import LoraAdapter, LoraLayer, LoraLinear
from lorakit.errors import ConfigError, TargetModuleError

_NITER = re.compile(r"pissa_niter_(\d+)")


@torch.no_grad()
def pissa_init(layer: LoraLayer, adapter: LoraAdapter, mode: str) -> None:
    """Set A, B from the SVD of the base weight and write the residual W0 − s·B·A into the base."""
    if not isinstance(layer, LoraLinear):
        raise TargetModuleError(f"PiSSA init works on Linear-like layers only, not {type(layer.base).__name__}; "
                                "exclude this layer from target_modules or use init_lora_weights=True")
    weight = layer.base_weight()
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"PiSSA needs a float32/float16/bfloat16 base weight, got {weight.dtype}")
    w = weight.float()
    w = w.T if layer.fan_in_fan_out else w  # (out, in)
    r, s = adapter.rank, adapter.scaling
    if r > min(w.shape):
        raise ConfigError(f"PiSSA rank {r} exceeds this layer's full rank {min(w.shape)}; lower r")
    if mode == "pissa":
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        u_r, s_r, vh_r = u[:, :r], sv[:r] / s, vh[:r]
    else:
        match = _NITER.fullmatch(mode)
        if match is None:
            raise ConfigError(f"init_lora_weights must be 'pissa' or 'pissa_niter_<K>', got {mode!r}")
        u_r, s_r, v_r = torch.svd_lowrank(w, r, niter=int(match.group(1)))  # (out, r), (r,), (in, r)
        s_r, vh_r = s_r / s, v_r.T
    lora_a = torch.diag(torch.sqrt(s_r)) @ vh_r  # (r, in)
    lora_b = u_r @ torch.diag(torch.sqrt(s_r))  # (out, r)
    adapter.lora_a.copy_(lora_a)
    adapter.lora_b.copy_(lora_b)
    # kept so the trained adapter can be re-expressed relative to W0 (to_lora_factors)
    adapter.register_buffer("pissa_a0", adapter.lora_a.detach().clone(), persistent=False)
    adapter.register_buffer("pissa_b0", adapter.lora_b.detach().clone(), persistent=False)
    residual_change = -((s * lora_b) @ lora_a)  # PEFT's order: W − (s·B)·A
    # not a buffer: never saved, counted or moved; the exact pre-init base, for restore_base
    adapter.__dict__["_pissa_original"] = _base_snapshot(layer)
    layer.add_to_base_weight(residual_change.T if layer.fan_in_fan_out else residual_change)


def _base_snapshot(layer: LoraLayer) -> tuple:
    """References to the base's own tensors (and a 4-bit quant state) plus copies of their values:
    a 4-bit base replaces its packed weight when the residual is added, a dense one mutates it."""
    base = layer.base
    own = list(base.named_parameters(recurse=False)) + list(base.named_buffers(recurse=False))
    tensors = {name: (ref, ref.detach().clone()) for name, ref in own}
    return tensors, getattr(base, "quant_state", None)


@torch.no_grad()
def restore_base(layer: LoraLayer, adapter: LoraAdapter) -> None:
    """Undo the PiSSA residual this adapter wrote into the base, bit for bit.

    Exact when no later PiSSA adapter on this layer rewrote the base since (the usual case: one
    PiSSA adapter per layer); otherwise the residual is added back in fp32 (rounding-close).
    """
    saved = adapter.__dict__.pop("_pissa_original", None)
    if saved is None:
        return
    later = list(layer.adapters.values())
    later = later[later.index(adapter) + 1:] if adapter in later else []
    if any("_pissa_original" in a.__dict__ for a in later) or layer.merged_adapters:
        change = (adapter.scaling * adapter.pissa_b0) @ adapter.pissa_a0
        layer.add_to_base_weight(change.T if layer.fan_in_fan_out else change)
        return
    tensors, quant_state = saved
    base = layer.base
    for name, (ref, value) in tensors.items():
        ref.data = value  # the original storage contents, dtype and shape
        table = base._parameters if name in base._parameters else base._buffers
        table[name] = ref  # a 4-bit base had swapped in a new packed tensor
    if quant_state is not None:
        base.quant_state = quant_state


def to_lora_factors(adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank 2r with s·B'A' = s·(B·A − B0·A0): the trained PiSSA update on the original W0.

    Use with lora_alpha doubled and r doubled (same scaling α/r), as PEFT's conversion does.
    """
    if not hasattr(adapter, "pissa_a0"):
        raise ConfigError("this adapter was not initialised with PiSSA (init_lora_weights='pissa...')")
    a = torch.cat([adapter.lora_a.detach(), adapter.pissa_a0], dim=0)  # (2r, in)
    b = torch.cat([adapter.lora_b.detach(), -adapter.pissa_b0], dim=1)  # (out, 2r)
    return a, b
