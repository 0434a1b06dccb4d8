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


def test_no_compiler_falls_back_to_pytorch_with_one_warning(monkeypatch, tmp_path, caplog):
    torch.manual_seed(2)
    packed, state = quantize_4bit(torch.randn(64, 96), 64, True, "nf4")
    expected = dequantize_4bit(packed, state)  # through the compiled loop
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))  # nothing built there yet
    monkeypatch.setenv("CC", "no-such-compiler-lorakit")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", False)
    with caplog.at_level("WARNING", logger="lorakit.quant.native"):
        assert not native.available()
        assert not native.available()
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    assert torch.equal(dequantize_4bit(packed, state), expected)  # same bits from the PyTorch ops


def test_builds_into_an_empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_failed", False)
    assert native.available()
    assert [p.name for p in tmp_path.iterdir()] == [f"lorakit_dequant4_{native._VERSION}.so"]  # no temp files left
