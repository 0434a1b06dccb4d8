"""QLoRA with bf16 compute: bf16 activations and 4-bit base, fp32 LoRA factors, on the fused training path.

References: float64 math on the same operands (the bf16 inputs, the dequantised bf16 weight and the fp32
factors are all exact in float64), with elementwise error bounds derived from the roundings the bf16
path makes, and PEFT + bitsandbytes for the forward where bnb's CPU dequantisation agrees with its
own state (BENCHMARKS.md, "bitsandbytes' CPU dequantisation is wrong on AVX-512 CPUs").
"""

import pytest
import torch
import torch.nn.functional as F

from lorakit.core.layers.linear import LoraLinear
from lorakit.quant import Linear4bit
from lorakit.quant.linear4bit import free_dequant_scratch

BF16 = torch.bfloat16
U_BF16 = 2.0**-8  # unit roundoff of bf16 (8 significant bits): |h(v) − v| ≤ U·|v|
U_F32 = 2.0**-24


def bound(magnitude: torch.Tensor, roundings: int, reduction: int) -> torch.Tensor:
    """Elementwise worst-case error of a result whose terms sum to at most ``magnitude`` in absolute value,
    computed with ``roundings`` roundings to bf16 (each at most U·|value|) and fp32 sums of length
    ``reduction`` (at most γ_K = K·u/(1 − K·u) relative, Higham's bound)."""
    gamma = reduction * U_F32 / (1 - reduction * U_F32)
    return ((1 + U_BF16) ** roundings * (1 + gamma) - 1) * magnitude


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    err = (actual.detach().double() - expected).abs()
    worst = float((err - tol).max())
    assert worst <= 0, f"{what}: error exceeds its rounding bound by {worst:.3g} (max |err| {float(err.max()):.3g})"


def _layer(base: torch.nn.Module, rank=4, alpha=8.0, dropout=0.0, seed=1) -> LoraLinear:
    layer = LoraLinear(base)
    layer.add_adapter("a", rank, alpha, dropout)
    layer.active_adapters = ["a"]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in layer.adapters.values():
            ad.lora_a.copy_(torch.randn(ad.lora_a.shape, generator=g) * 0.2)
            ad.lora_b.copy_(torch.randn(ad.lora_b.shape, generator=g) * 0.2)
    layer.train()
    return layer


def _quant_base(out_f=40, in_f=96, bias=True, seed=0, source=BF16) -> tuple[Linear4bit, torch.Tensor]:
    """A bf16-compute 4-bit layer quantised from a ``source``-dtype Linear (its bias stays in that dtype)."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_f, out_f, bias=bias).to(source)
    q = Linear4bit.from_linear(linear, compute_dtype=BF16)
    return q, q.dequantize(BF16)


def _reference(x, w, bias, a, b, s, g, x_drop=None):
    """float64 forward and gradients with the magnitudes their error bounds scale with."""
    x64, w64, a64, b64, g64 = (t.detach().double() for t in (x, w, a, b, g))
    x64, g64 = x64.reshape(-1, x.shape[-1]), g64.reshape(-1, g.shape[-1])  # (tokens, features)
    xd64 = x64 if x_drop is None else x_drop.detach().double().reshape(x64.shape)
    bias64 = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    u64 = xd64 @ a64.T
    y = x64 @ w64.T + bias64 + s * u64 @ b64.T
    m_y = x64.abs() @ w64.abs().T + bias64.abs() + s * (xd64.abs() @ a64.abs().T) @ b64.abs().T
    gb64 = g64 @ b64
    grad_lora_x = s * gb64 @ a64  # gradient w.r.t. the LoRA branch's input
    m_gx = g64.abs() @ w64.abs() + s * (g64.abs() @ b64.abs()) @ a64.abs()
    grad_a = s * gb64.T @ xd64
    m_ga = s * (g64.abs() @ b64.abs()).T @ xd64.abs()
    grad_b = s * g64.T @ u64
    m_gb = s * g64.abs().T @ (xd64.abs() @ a64.abs().T)
    as_x, as_y = (lambda t: t.reshape(x.shape)), (lambda t: t.reshape(*x.shape[:-1], w.shape[0]))
    return as_y(y), as_y(m_y), as_x(grad_lora_x), as_x(m_gx), as_x(g64 @ w64), (grad_a, m_ga), (grad_b, m_gb)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(40, 96), (64, 128)])
@pytest.mark.parametrize("source", [BF16, torch.float32])
def test_bf16_step_matches_float64_math_within_bf16_rounding(bias, shape, source):
    """y = h(h(x·Wᵀ + b) + s·h(u)·h(B)ᵀ): four roundings to bf16 at most (base, u, B, y); the input gradient
    the same four; the fp32 factor gradients only fp32 sums. From an fp32 Linear the bias stays fp32 and
    is used as h(b), as Linear4bit.forward uses it."""
    out_f, in_f = shape
    q, w = _quant_base(out_f, in_f, bias, source=source)
    layer = _layer(q)
    ad = layer.adapters["a"]
    assert layer._fusable_adapter(torch.ones(1, in_f, dtype=BF16, requires_grad=True)) is ad
    x = torch.randn(3, 7, in_f, generator=torch.Generator().manual_seed(2)).to(BF16).requires_grad_(True)
    y = layer(x)
    assert y.dtype == BF16 and type(y.grad_fn).__name__ == "_FusedLoraLinearBackward"
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(BF16)
    y.backward(g)
    s = ad.scaling
    bias_used = None if q.bias is None else q.bias.to(BF16)
    ref_y, m_y, lora_gx, m_gx, base_gx, (ga, m_ga), (gb, m_gb) = _reference(x, w, bias_used, ad.lora_a, ad.lora_b, s, g)
    assert_within(y, ref_y, bound(m_y, 4, in_f + 2), "forward")
    assert_within(x.grad, base_gx + lora_gx, bound(m_gx, 4, out_f + 2), "input gradient")
    assert ad.lora_a.grad.dtype == ad.lora_b.grad.dtype == torch.float32
    tokens = x.shape[0] * x.shape[1]
    assert_within(ad.lora_a.grad, ga, bound(m_ga, 0, out_f + tokens + 2), "dA")
    assert_within(ad.lora_b.grad, gb, bound(m_gb, 0, in_f + tokens + 2), "dB")
    # the bound is tight enough to catch a dropped or doubled LoRA term at most outputs
    lora_y = ref_y - (x.detach().double() @ w.double().T + (bias_used.double() if bias else 0))
    assert float((lora_y.abs() > bound(m_y, 4, in_f + 2)).double().mean()) > 0.5


def test_bf16_step_dequantises_straight_to_bf16_into_the_scratch_buffer():
    """One dequantisation in forward and one in backward, each written as bf16 into the thread's bf16
    scratch buffer (no fp32 copy of W, no fresh tensor per call)."""
    from lorakit.quant import linear4bit

    q, _ = _quant_base(48, 64)
    layer = _layer(q)
    calls, original = [], q.dequantize

    def recorded(dtype=None, out=None):
        calls.append((dtype, None if out is None else out.data_ptr()))
        return original(dtype, out=out)

    q.dequantize = recorded
    free_dequant_scratch()
    x = torch.randn(5, 64).to(BF16).requires_grad_(True)
    layer(x).sum().backward()
    scratch = linear4bit._scratch.__dict__
    assert set(scratch) == {BF16}
    assert calls == [(BF16, scratch[BF16].data_ptr())] * 2
    free_dequant_scratch()


def test_bf16_dropout_is_drawn_on_the_fp32_cast_and_gradients_match():
    """With dropout the LoRA branch's input is dropout(fp32(x)), as in the general path and PEFT."""
    q, w = _quant_base(40, 96, bias=False)
    p = 0.25
    layer = _layer(q, dropout=p)
    ad = layer.adapters["a"]
    x = torch.randn(6, 96, generator=torch.Generator().manual_seed(4)).to(BF16).requires_grad_(True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = F.dropout(x.detach().float(), p, training=True)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(BF16)
    y.backward(g)
    ref_y, m_y, lora_gx, m_gx, base_gx, (ga, m_ga), _ = _reference(x, w, None, ad.lora_a, ad.lora_b, ad.scaling, g, xd)
    assert_within(y, ref_y, bound(m_y, 4, 98), "forward")
    keep = (xd != 0).double() / (1 - p)  # dropout's backward scales the LoRA branch's gradient by mask/(1-p)
    m_gx = g.double().abs() @ w.double().abs() + keep * (m_gx - g.double().abs() @ w.double().abs())
    assert_within(x.grad, base_gx + keep * lora_gx, bound(m_gx, 4, 42), "input gradient")
    assert_within(ad.lora_a.grad, ga, bound(m_ga, 0, 40 + 6 + 2), "dA")


def test_bf16_dense_linear_with_fp32_factors_takes_the_fused_path_too():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24).to(BF16)
    layer = _layer(base)
    ad = layer.adapters["a"]
    x = torch.randn(10, 32).to(BF16).requires_grad_(True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_FusedLoraLinearBackward"
    g = torch.randn(y.shape).to(BF16)
    y.backward(g)
    ref_y, m_y, lora_gx, m_gx, base_gx, (ga, m_ga), (gb, m_gb) = _reference(
        x, base.weight, base.bias, ad.lora_a, ad.lora_b, ad.scaling, g)
    assert_within(y, ref_y, bound(m_y, 4, 34), "forward")
    assert_within(x.grad, base_gx + lora_gx, bound(m_gx, 4, 26), "input gradient")
    assert_within(ad.lora_b.grad, gb, bound(m_gb, 0, 32 + 10 + 2), "dB")
    with torch.no_grad():  # the general path (no autograd) computes the same function within the same bounds
        assert_within(layer(x), ref_y, bound(m_y, 4, 34), "general-path forward")


def test_bf16_forward_matches_peft_and_bitsandbytes(bnbf):
    """The same NF4 bytes in bitsandbytes' Linear4bit under PEFT's LoRA (compute dtype bf16, fp32 factors):
    both outputs lie within their rounding bounds of the float64 math, so within the sum of the bounds of
    each other (PEFT rounds the base output, the LoRA term and their sum: three roundings)."""
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from quant_helpers import closed_form_dequant

    out_f, in_f = 96, 128  # in a multiple of the blocksize: bnb's CPU kernel agrees with its state here
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_f, out_f, bias=False).to(BF16)
    ours = _layer(Linear4bit.from_linear(linear, compute_dtype=BF16))
    theirs_base = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=BF16, quant_type="nf4",
                                    compress_statistics=True)
    theirs_base.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                           compress_statistics=True, blocksize=64)._quantize("cpu")
    holder = torch.nn.Sequential(theirs_base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"])
    theirs = peft.get_peft_model(holder, cfg)
    pl = theirs.base_model.model[0]
    assert pl.lora_A["default"].weight.dtype == torch.float32  # PEFT's default: fp32 factors on a bf16 base
    ad = ours.adapters["a"]
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(ad.lora_a)
        pl.lora_B["default"].weight.copy_(ad.lora_b)
    bstate = theirs_base.weight.quant_state
    assert torch.equal(theirs_base.weight.data.reshape(-1), ours.base.weight.reshape(-1))  # same bytes
    w = closed_form_dequant(theirs_base.weight.data, bstate)
    assert torch.equal(w, ours.base.dequantize(BF16))
    if not torch.equal(bnbf.dequantize_4bit(theirs_base.weight.data, bstate).reshape(w.shape), w):
        pytest.skip("bitsandbytes' CPU dequantisation disagrees with its own state on this CPU; the float64 "
                    "tests above hold the math")
    theirs.train()
    x = torch.randn(4, 9, in_f, generator=torch.Generator().manual_seed(2)).to(BF16)
    y_ours = ours(x.clone().requires_grad_(True))
    y_theirs = theirs(x.clone().requires_grad_(True))
    assert y_theirs.dtype == y_ours.dtype == BF16
    ref_y, m_y, *_ = _reference(x, w, None, ad.lora_a, ad.lora_b, ad.scaling, torch.zeros(4, 9, out_f))
    assert_within(y_theirs, ref_y, bound(m_y, 3, in_f + 2), "PEFT + bnb forward")
    assert_within(y_ours, y_theirs.double(), bound(m_y, 4, in_f + 2) + bound(m_y, 3, in_f + 2), "vs PEFT + bnb")
