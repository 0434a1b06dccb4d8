"""Shared fixtures for the quantisation tests: bitsandbytes as the bit-exactness reference."""

import pytest
import torch
import torch._dynamo


@pytest.fixture
def bnbf():
    """``bitsandbytes.functional``, set up so the comparison tests stay fast.

    - torch.compile is off: bnb's fallback dequantisation (odd last dimensions) is wrapped in it
      and would spend seconds compiling per shape; eager mode gives the same numbers.
    - torch runs single-threaded: bnb's C kernels bring their own OpenMP pool, and on a 2-core
      machine its spinning threads stall torch's pool (a 2 ms op becomes 20 ms).
    """
    functional = pytest.importorskip("bitsandbytes.functional")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch._dynamo.config.patch(disable=True):
            yield functional
    finally:
        torch.set_num_threads(threads)
