"""Triton kernels (lorakit.kernels) under TRITON_INTERPRET=1 against plain PyTorch math.

Small shapes (the interpreter runs each program through numpy): odd sizes, sizes that are not a
multiple of a tile or of the quantisation block, ranks below the 16-wide dot minimum. Dequantised
values are bit-exact (one fp32 multiply per value, as in ``dequantize_4bit``); matmuls differ from
PyTorch's only by fp32 summation order, so they are held to ``tests/tolerance.py``'s bound.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from tolerance import assert_close_fp32  # noqa: E402

from lorakit import kernels  # noqa: E402
from lorakit.kernels import lora, nf4  # noqa: E402
from lorakit.quant import dequantize_4bit, quantize_4bit  # noqa: E402


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((40, 96), 64), ((33, 65), 32), ((7, 300), 256), ((1000,), 64)])
def test_dequantize_kernel_is_bit_exact(quant_type, double_quant, shape, blocksize):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    packed, state = quantize_4bit(w, blocksize, double_quant, quant_type)
    assert torch.equal(nf4.dequantize(packed, state), dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_kernel_half_dtypes(dtype):
    torch.manual_seed(1)
    packed, state = quantize_4bit(torch.randn(24, 64).to(dtype), 64, True, "nf4")
    got = nf4.dequantize(packed, state)
    assert got.dtype == dtype and torch.equal(got, dequantize_4bit(packed, state))


@pytest.mark.parametrize("m,n_out,n_in,bias", [(5, 40, 96, True), (37, 70, 130, False), (1, 16, 64, True)])
def test_fused_nf4_linear_forward_and_backward(m, n_out, n_in, bias):
    torch.manual_seed(2)
    packed, state = quantize_4bit(torch.randn(n_out, n_in) * 0.1, 64, True, "nf4")
    w = dequantize_4bit(packed, state)
    b = torch.randn(n_out) if bias else None
    x = torch.randn(m, n_in, requires_grad=True)
    y = nf4.NF4Linear.apply(x, packed, state, b)
    expected = x.detach() @ w.T + (b if bias else 0)
    assert_close_fp32(y, expected, reduction=n_in, depth=2)
    g = torch.randn(m, n_out)
    y.backward(g)
    assert_close_fp32(x.grad, g @ w, reduction=n_out, depth=2)


def test_lora_add_matches_torch_and_returns_u():
    torch.manual_seed(3)
    x, y = torch.randn(2, 9, 48), torch.randn(2, 9, 72)
    a, b = torch.randn(8, 48), torch.randn(72, 8)
    expected = y + 0.75 * (x @ a.T) @ b.T
    out = y.clone()
    u = lora.lora_add_(out, x, a, b, 0.75)
    assert_close_fp32(u, (x @ a.T).reshape(-1, 8), reduction=48, depth=2)
    assert_close_fp32(out, expected, reduction=48 * 8, depth=3)


def test_sgmv_every_row_meets_only_its_own_adapter():
    torch.manual_seed(4)
    t, n_in, n_out, ranks = 29, 40, 70, [4, 8, 16]
    x, y = torch.randn(t, n_in), torch.randn(t, n_out)
    a_stack = torch.zeros(3, 16, n_in)
    b_stack = torch.zeros(3, n_out, 16)
    for i, r in enumerate(ranks):  # lower ranks zero-padded, as the serving path stacks them
        a_stack[i, :r] = torch.randn(r, n_in)
        b_stack[i, :, :r] = torch.randn(n_out, r)
    scales = torch.tensor([0.5, 2.0, 1.0])
    row_adapter = torch.tensor([(i * 7) % 4 - 1 for i in range(t)])  # -1 (base) and 0..2, interleaved
    expected = y.clone()
    for i in range(t):
        k = int(row_adapter[i])
        if k >= 0:
            expected[i] += scales[k] * (x[i] @ a_stack[k].T) @ b_stack[k].T
    out = lora.sgmv_add_(y.clone(), x, a_stack, b_stack, scales, row_adapter)
    assert_close_fp32(out, expected, reduction=n_in * 16, depth=3)
    untouched = row_adapter < 0
    assert torch.equal(out[untouched], y[untouched])  # base rows are never written


def test_segments_sort_rows_stably_and_drop_the_base():
    rows, starts, slots, max_len = lora.segments(torch.tensor([2, -1, 0, 2, 0, -1, 2]))
    assert rows.tolist() == [2, 4, 0, 3, 6]
    assert starts.tolist() == [0, 2, 5] and slots.tolist() == [0, 2] and max_len == 3


def test_never_selected_on_cpu_in_normal_use(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.delenv("LORAKIT_TRITON", raising=False)
    assert not kernels.enabled_for(x)  # CPU tensor, even with triton importable and the interpreter on
    monkeypatch.setenv("LORAKIT_TRITON", "interpret")
    assert kernels.enabled_for(x)  # the tests' explicit opt-in (interpreter only)
    monkeypatch.setenv("LORAKIT_TRITON", "0")
    assert not kernels.enabled_for(x)


def test_fused_nf4_linear_bf16_compute():
    """bf16 activations (the usual GPU compute dtype): W tiles rounded to bf16 exactly as
    ``dequantize_4bit(…, bfloat16)`` rounds them, fp32 accumulation, one rounding of the output."""
    torch.manual_seed(5)
    packed, state = quantize_4bit(torch.randn(48, 80) * 0.1, 64, True, "nf4")
    w16 = dequantize_4bit(packed, state, torch.bfloat16)
    x = torch.randn(7, 80).to(torch.bfloat16)
    y = nf4.linear(x, packed, state)
    assert y.dtype == torch.bfloat16
    expected = x.float() @ w16.float().T  # exact products of the same bf16 operands, fp32 sums
    bf16_ulp = torch.finfo(torch.bfloat16).eps  # the output's single rounding (to nearest or truncated)
    atol = bf16_ulp * float(expected.abs().max()) + 4 * 80**0.5 * torch.finfo(torch.float32).eps * float(
        expected.abs().max()
    )
    assert float((y.float() - expected).abs().max()) <= atol
    gx = nf4.grad_input(torch.ones(7, 48, dtype=torch.bfloat16), packed, state)
    exp_gx = torch.ones(7, 48) @ w16.float()
    assert float((gx.float() - exp_gx).abs().max()) <= bf16_ulp * float(exp_gx.abs().max()) * 2


def test_lora_add_bf16():
    torch.manual_seed(6)
    x, y = torch.randn(11, 48).to(torch.bfloat16), torch.randn(11, 72).to(torch.bfloat16)
    a, b = (torch.randn(8, 48) * 0.1).to(torch.bfloat16), (torch.randn(72, 8) * 0.1).to(torch.bfloat16)
    out = y.clone()
    u = lora.lora_add_(out, x, a, b, 2.0)
    u_ref = (x.float() @ a.float().T).to(torch.bfloat16)  # u is kept in the activations' dtype
    expected = y.float() + 2.0 * (u_ref.float() @ b.float().T)
    ulp = torch.finfo(torch.bfloat16).eps
    assert float((u.float() - u_ref.float()).abs().max()) <= ulp * float(u_ref.float().abs().max())
    assert float((out.float() - expected).abs().max()) <= 4 * ulp * float(expected.abs().max())
