"""Triton kernels for the GPU path: fused NF4 linear, the LoRA add, and Punica-style SGMV.

* ``nf4``: 4-bit weights decoded tile by tile inside the matmul (forward ``x·Wᵀ`` and backward
  ``g·W``), so the dense weight never exists in GPU memory; plus a standalone dequantisation.
* ``lora``: ``y += s·(x·Aᵀ)·Bᵀ`` as a shrink kernel (x·Aᵀ, rank r) and an expand kernel that
  accumulates into the base output in place; and the multi-adapter version used by serving,
  where rows are sorted by adapter and each kernel program works on one adapter's segment
  (Punica's SGMV: segmented gather matrix-vector multiplication).

Selection: :func:`enabled_for` is True only for CUDA tensors, with triton importable and
``LORAKIT_TRITON`` not set to 0. CPU tensors never take these paths in normal use. Tests run the
kernels on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), against plain PyTorch.

GPU speed is unmeasured: no GPU was available while writing them (BENCHMARKS.md, "GPU path").
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    """True if ``import triton`` works (a CUDA build of torch is still needed to use it on a GPU)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run on CPU tensors through numpy (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def enabled_for(*tensors: torch.Tensor) -> bool:
    """Whether lorakit's Triton kernels should handle an op on ``tensors``: all on CUDA, triton importable,
    and not switched off with ``LORAKIT_TRITON=0``.

    Tests set ``LORAKIT_TRITON=interpret`` together with ``TRITON_INTERPRET=1`` to send CPU tensors
    through the same layer code paths under the interpreter; nothing else ever selects them on CPU.
    """
    mode = os.environ.get("LORAKIT_TRITON", "1").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return False
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    on_cpu_for_tests = mode == "interpret" and interpreting()
    if not (on_cpu_for_tests or all(t.is_cuda for t in tensors)):
        return False
    return triton_available()
