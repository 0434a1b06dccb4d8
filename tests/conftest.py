"""Suite-wide fixtures and settings."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture
def input_ids():
    torch.manual_seed(123)
    return torch.randint(0, 128, (4, 10))
