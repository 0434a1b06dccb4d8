"""Shared fixtures for the quantisation tests: bitsandbytes as the bit-exactness reference."""

import pytest
import torch
import torch._dynamo


@pytest.fixture(autouse=True)
def single_thread():
    """Run these small-tensor tests on one intra-op thread.

    On a busy 2-core machine an OpenMP barrier waits for a descheduled sibling thread, which
    turns a 50 µs matmul into 20 ms; tiny tensors gain nothing from a second thread anyway.
    It also keeps bitsandbytes' own OpenMP pool (its C kernels) from fighting torch's.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def bnbf():
    """``bitsandbytes.functional`` with torch.compile off: bnb's fallback dequantisation (odd last
    dimensions) is wrapped in torch.compile, which would spend seconds compiling per shape."""
    functional = pytest.importorskip("bitsandbytes.functional")
    with torch._dynamo.config.patch(disable=True):
        yield functional
