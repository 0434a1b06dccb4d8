"""NF4 / FP4 quantisation is bit-identical to bitsandbytes 0.50 (bytes, scales, dequantised values)."""

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quant_helpers import bnb_dequant_checked

from lorakit.quant import (
    QuantState,
    dequantize_4bit,
    dequantize_fp4,
    dequantize_nf4,
    dynamic_map,
    get_code,
    quantize_4bit,
    quantize_fp4,
    quantize_nf4,
)
from lorakit.quant.blockwise8 import quantize_blockwise

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_same_as_bnb(bnbf, weight, blocksize, double_quant, quant_type):
    ref_packed, ref_state = bnbf.quantize_4bit(
        weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    packed, state = quantize_4bit(weight, blocksize, double_quant, quant_type)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(state.code, ref_state.code)
    assert (state.shape, state.dtype, state.blocksize) == (
        ref_state.shape,
        ref_state.dtype,
        ref_state.blocksize,
    )
    assert state.nested == ref_state.nested == double_quant
    if double_quant:
        assert torch.equal(state.offset, ref_state.offset)
        assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
        assert torch.equal(state.state2.code, ref_state.state2.code)
        assert state.state2.blocksize == ref_state.state2.blocksize == 256
    if weight.numel() <= 2:  # bnb transposes single-byte inputs and fails on them beyond 2-D
        ref_state = copy.copy(ref_state)
        ref_state.shape = torch.Size([weight.numel()])
    ref = bnb_dequant_checked(bnbf, ref_packed, ref_state, quant_type).reshape(weight.shape)
    out = dequantize_4bit(packed, state)
    assert out.dtype == ref.dtype == weight.dtype and out.shape == ref.shape == weight.shape
    assert torch.equal(out, ref)


def test_code_books_match_bnb(bnbf):
    assert torch.equal(get_code("nf4"), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(get_code("fp4"), bnbf.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map())
    nf4 = get_code("nf4")
    assert nf4[7] == 0 and nf4[0] == -1 and nf4[15] == 1 and bool((nf4.diff() > 0).all())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3,), (7, 13), (64, 64), (300, 70), (97, 129), (5, 3, 41)])
def test_bit_exact_with_bnb(bnbf, shape, dtype, blocksize, double_quant, quant_type):
    gen = torch.Generator().manual_seed(hash((shape, blocksize)) % 2**31)
    weight = (torch.randn(shape, generator=gen) * 0.3).to(dtype)
    assert_same_as_bnb(bnbf, weight, blocksize, double_quant, quant_type)


def test_bit_exact_large_multi_chunk(bnbf):
    # more values than one internal chunk (2**16), with a partial last block and odd count
    weight = torch.randn(1023, 257, generator=torch.Generator().manual_seed(1))
    for quant_type in ("nf4", "fp4"):
        assert_same_as_bnb(bnbf, weight, 64, True, quant_type)
    assert_same_as_bnb(bnbf, weight.bfloat16(), 128, True, "nf4")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(1, 90), min_size=1, max_size=3),
    blocksize=st.sampled_from([32, 64, 128, 256]),
    dtype=st.sampled_from(DTYPES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    scale=st.sampled_from([1e-3, 1.0, 40.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_bit_exact_property(bnbf, shape, blocksize, dtype, quant_type, scale, seed):
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    assert_same_as_bnb(bnbf, weight, blocksize, True, quant_type)


def _around(points: torch.Tensor, ulps: int) -> torch.Tensor:
    """Every float32 within ``ulps`` steps of each point."""
    out = []
    for p in points:
        v = p.clone()
        for _ in range(ulps):
            v = torch.nextafter(v, torch.tensor(-2.0))
        for _ in range(2 * ulps + 1):
            out.append(v.clone())
            v = torch.nextafter(v, torch.tensor(2.0))
    return torch.stack(out)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_and_decision_bounds(bnbf, quant_type):
    code = get_code(quant_type).sort().values
    bounds = (code[:-1] + code[1:]) / 2
    body = _around(bounds, 4)
    body = torch.cat([body, torch.zeros((-body.numel()) % 63)]).view(-1, 63)
    weight = torch.cat([torch.ones(body.shape[0], 1), body], dim=1)  # absmax 1 in every block
    for scale in (1.0, 0.7, 3e-30, 2e30):
        assert_same_as_bnb(bnbf, weight * scale, 64, True, quant_type)


def test_zero_and_tiny_blocks(bnbf):
    weight = torch.zeros(12, 64)
    weight[3] = 1e-40  # subnormal block
    weight[5, 7] = -2.0
    weight[9, :5] = torch.tensor([1e-38, -3e-39, 0.0, 2e-39, 1e-45])
    for quant_type in ("nf4", "fp4"):
        assert_same_as_bnb(bnbf, weight, 64, True, quant_type)
        assert_same_as_bnb(bnbf, weight.view(-1)[:700], 64, True, quant_type)  # zero tail block


def test_double_quant_grid_rounding_matches_bnb(bnbf):
    # bnb's CPU 8-bit kernel rounds through a 65536-point grid, not to the exact nearest code;
    # values a few ulps around every midpoint of the dynamic map exercise that.
    code = dynamic_map()
    near_mid = _around((code[:-1] + code[1:]) / 2, 20)
    x = torch.cat([torch.tensor([1.0]), near_mid, torch.zeros(300), torch.randn(5000)])
    for scale in (1.0, 0.37, 3.3e-3, 1e5):
        ref_q, ref_state = bnbf.quantize_blockwise(x * scale, blocksize=256)
        q, absmax = quantize_blockwise(x * scale, code, 256)
        assert torch.equal(q, ref_q)
        assert torch.equal(absmax, ref_state.absmax)


def test_bits_per_parameter():
    weight = torch.randn(512, 512)  # a multiple of 64 * 256 values: no partial blocks
    n = weight.numel()
    for double_quant, expected in ((True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4 + 32 / 64)):
        packed, state = quantize_nf4(weight, 64, double_quant)
        bits = (packed.numel() * packed.element_size() + state.nbytes()) * 8 / n
        overhead = (16 * 4 + (256 * 4 + 4 if double_quant else 0)) * 8 / n  # code books + offset
        assert bits == pytest.approx(expected + overhead, abs=1e-12)
    assert round(4 + 8 / 64 + 32 / (64 * 256), 3) == 4.127


def test_round_trip_error_is_within_half_a_code_gap():
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_nf4(weight, 64, double_quant=False)
    restored = dequantize_nf4(packed, state)
    absmax = weight.view(-1, 64).abs().amax(1, keepdim=True)
    max_gap = get_code("nf4").diff().max()
    assert bool(((restored - weight).view(-1, 64).abs() <= absmax * max_gap / 2 + 1e-7).all())
    assert torch.equal(
        dequantize_fp4(*quantize_fp4(weight)), dequantize_4bit(*quantize_4bit(weight, quant_type="fp4"))
    )


def test_out_dtype_is_fp32_math_then_cast():
    weight = torch.randn(33, 64)
    packed, state = quantize_nf4(weight)
    full = dequantize_nf4(packed, state)
    assert torch.equal(dequantize_4bit(packed, state, torch.bfloat16), full.bfloat16())
    assert torch.equal(dequantize_4bit(packed, state, torch.float16), full.half())


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, 64.0, True, "64"])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="power of two"):
        quantize_nf4(torch.randn(4, 64), blocksize=blocksize)


@pytest.mark.parametrize(
    "weight", [torch.ones(4, 64, dtype=torch.int32), torch.ones(4, 64, dtype=torch.uint8)]
)
def test_non_float_weight(weight):
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(weight)


def test_unsupported_inputs():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_nf4(torch.randn(4, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_nf4([[1.0, 2.0]])
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 64))
    bad = torch.randn(4, 64)
    bad[2, 3] = math.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nf4(bad)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_4bit(torch.randn(64), quant_type="int4")


def test_state_that_does_not_match_its_data():
    packed, state = quantize_nf4(torch.randn(16, 64))
    other_packed, other_state = quantize_nf4(torch.randn(16, 128))
    with pytest.raises(ValueError, match="belongs to another tensor"):
        dequantize_nf4(packed, other_state)
    with pytest.raises(ValueError, match="belongs to another tensor"):
        dequantize_nf4(other_packed, state)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_nf4(packed.to(torch.int16), state)
    with pytest.raises(TypeError, match="QuantState"):
        dequantize_nf4(packed, {"absmax": state.absmax})
    truncated = QuantState(**{**state.__dict__, "absmax": state.absmax[:-1]})
    with pytest.raises(ValueError, match="block scales"):
        dequantize_nf4(packed, truncated)
    with pytest.raises(ValueError, match="fp4 codes"):
        dequantize_nf4(*quantize_fp4(torch.randn(64)))
    nested_without_state2 = QuantState(**{**state.__dict__, "state2": None})
    with pytest.raises(ValueError, match="float32"):
        dequantize_nf4(packed, nested_without_state2)
