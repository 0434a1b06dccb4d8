"""Suite-wide fixtures and settings."""

from __future__ import annotations

import os

# Triton kernels (tests/kernels) run on CPU under Triton's interpreter. The variable must be set
# before anything imports triton (torch and transformers may, lazily): triton reads it when its
# kernels are decorated, and a kernel calling a helper decorated before it was set fails.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# CLI commands run in-process here pick their thread count like a user's would (lorakit.threads);
# one thread keeps tiny test models fast on a shared CPU and the CLI's stderr free of the choice line
os.environ.setdefault("LORAKIT_THREADS", "1")

# LORAKIT_TEST_THREADS=1 (or 2) runs the whole suite at that intra-op thread count: no verdict may
# depend on it (GEMMs split their reductions differently per thread count).
if os.environ.get("LORAKIT_TEST_THREADS"):
    os.environ["LORAKIT_THREADS"] = os.environ["LORAKIT_TEST_THREADS"]  # in-process CLI runs keep it too
    torch.set_num_threads(int(os.environ["LORAKIT_TEST_THREADS"]))


@pytest.fixture
def input_ids():
    torch.manual_seed(123)
    return torch.randint(0, 128, (4, 10))
