"""The compiled dequantisation loop (lorakit.quant.native) against the PyTorch path and the closed form.

Every SIMD level the CPU has (AVX-512, AVX2, scalar) is pinned in turn, so a CI machine without
AVX-512 still checks the paths it can run; all must give the same bits as ``code[nibble] · scale``
computed in fp32 and cast once.
"""

import pytest
import torch
from quant_helpers import closed_form_dequant

from lorakit.quant import dequantize_4bit, native, quantize_4bit
from lorakit.quant.codes import _code, pair_table

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native loop isn't built")

SHAPES = [(576, 192), (48, 80), (33, 65), (1000,), (3, 4, 64)]


def _native(packed, state, dtype, simd):
    n, bs = state.numel, state.blocksize
    full = n - n % bs
    out = torch.full((full,), float("nan"), dtype=dtype)
    native.dequant_full_blocks(
        packed.reshape(-1).contiguous(), _code(state.quant_type), pair_table(state.quant_type), state, out,
        full // bs, simd=simd,
    )
    return out


@pytest.mark.parametrize("simd", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_every_simd_level_matches_the_closed_form(simd, dtype, quant_type, double_quant):
    if dtype == torch.float16 and not native.available(torch.float16):
        pytest.skip("this compiler has no _Float16")
    for i, shape in enumerate(SHAPES):
        for blocksize in (32, 64, 256):
            torch.manual_seed(i)
            w = (torch.randn(shape) * 3).to(dtype)
            packed, state = quantize_4bit(w, blocksize, double_quant, quant_type)
            expected = closed_form_dequant(packed, state).reshape(-1)  # (n,) fp32 math, cast once
            got = _native(packed, state, dtype, simd)
            assert torch.equal(got, expected[: got.numel()]), (shape, blocksize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_and_pytorch_paths_agree(monkeypatch, dtype):
    torch.manual_seed(0)
    w = (torch.randn(97, 130) * 0.02).to(dtype)  # a partial last block goes through the tail path
    packed, state = quantize_4bit(w, 64, True, "nf4")
    fast = dequantize_4bit(packed, state)
    monkeypatch.setenv("LORAKIT_NATIVE", "0")
    assert not native.available()
    slow = dequantize_4bit(packed, state)
    assert fast.dtype == slow.dtype == dtype and torch.equal(fast, slow)


def test_out_dtype_override_uses_the_same_bits(monkeypatch):
    torch.manual_seed(1)
    packed, state = quantize_4bit(torch.randn(64, 128), 64, True, "nf4")
    fast = dequantize_4bit(packed, state, torch.bfloat16)
    monkeypatch.setenv("LORAKIT_NATIVE", "0")
    assert torch.equal(fast, dequantize_4bit(packed, state, torch.bfloat16))
