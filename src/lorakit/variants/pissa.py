"""PiSSA init (Meng et al. 2024): the adapter starts as the top-r singular part of W0.

    W0 = U S Vᵀ,   A = √(S_r/s) · V_rᵀ,   B = U_r · √(S_r/s),   frozen base ← W0 − s·B·A

so the model's output is unchanged at init while the adapter trains the principal directions.
``init_lora_weights="pissa"`` uses a full SVD; ``"pissa_niter_K"`` uses ``torch.svd_lowrank``
with K subspace iterations (fast, randomised: its residual depends on the torch RNG). These are
PEFT's exact conventions (``pissa_init`` in peft/tuners/lora/layer.py), including its file format:
the folder is a plain LoRA folder whose config says ``init_lora_weights="pissa"``, and loading
it re-runs the init on the *original* base (same residual) before the trained factors are copied.

Deleting a PiSSA adapter leaves the residual in the base (as in PEFT); :func:`to_lora_factors`
gives the equivalent rank-2r plain LoRA relative to the original W0 (PEFT's
``path_initial_model_for_weight_conversion``), which needs no change to the base.
"""

from __future__ import annotations

import re

import torch

from lorakit.errors import ConfigError, TargetModuleError
from lorakit.layers import LoraAdapter, LoraLayer, LoraLinear

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
    layer.add_to_base_weight(residual_change.T if layer.fan_in_fan_out else residual_change)


def to_lora_factors(adapter: LoraAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank 2r with s·B'A' = s·(B·A − B0·A0): the trained PiSSA update on the original W0.

    Use with lora_alpha doubled and r doubled (same scaling α/r), as PEFT's conversion does.
    """
    if not hasattr(adapter, "pissa_a0"):
        raise ConfigError("this adapter was not initialised with PiSSA (init_lora_weights='pissa...')")
    a = torch.cat([adapter.lora_a.detach(), adapter.pissa_a0], dim=0)  # (2r, in)
    b = torch.cat([adapter.lora_b.detach(), -adapter.pissa_b0], dim=1)  # (out, 2r)
    return a, b
