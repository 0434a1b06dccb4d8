"""Layer math against closed forms written with plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from lorakit.core.layers import LoraConv, LoraEmbedding, LoraLinear, LoraParameter


def _randomize(layer, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in layer.adapters.values():
            ad.lora_a.copy_(torch.randn(ad.lora_a.shape, generator=g))
            ad.lora_b.copy_(torch.randn(ad.lora_b.shape, generator=g) * scale)


def _linear_layer(in_f=16, out_f=12, rank=4, alpha=8.0, bias=True, dropout=0.0):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(in_f, out_f, bias=bias))
    layer.add_adapter("a", rank, alpha, dropout)
    layer.active_adapters = ["a"]
    return layer


def test_fresh_adapter_is_exactly_the_base():
    layer = _linear_layer()
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), layer.base(x))
    ad = layer.adapters["a"]
    assert torch.count_nonzero(ad.lora_b) == 0 and torch.count_nonzero(ad.lora_a) > 0


def test_kaiming_uniform_init_bounds_match_peft():
    layer = _linear_layer(in_f=64, rank=8)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in 64 gives U(-1/√fan_in, 1/√fan_in)
    a = layer.adapters["a"].lora_a
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound


def test_gaussian_init_std():
    layer = LoraLinear(nn.Linear(256, 8))
    torch.manual_seed(0)
    layer.add_adapter("g", 4, 4, 0.0, init="gaussian")
    assert abs(layer.adapters["g"].lora_a.std().item() - 1 / 4) < 0.02


@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_closed_form(bias):
    layer = _linear_layer(bias=bias)
    _randomize(layer)
    ad = layer.adapters["a"]
    x = torch.randn(2, 7, 16)
    expected = x @ layer.base.weight.T + (layer.base.bias if bias else 0) + (x @ ad.lora_a.T @ ad.lora_b.T) * 2.0
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight("a"), 2.0 * ad.lora_b @ ad.lora_a)


def test_fused_path_gradients_equal_plain_autograd():
    layer = _linear_layer()
    _randomize(layer)
    ad = layer.adapters["a"]
    x = torch.randn(3, 5, 16, requires_grad=True)
    layer(x).pow(2).sum().backward()
    grads = (x.grad.clone(), ad.lora_a.grad.clone(), ad.lora_b.grad.clone())
    x2 = x.detach().clone().requires_grad_(True)
    a, b = ad.lora_a.detach().clone().requires_grad_(True), ad.lora_b.detach().clone().requires_grad_(True)
    ref = F.linear(x2, layer.base.weight, layer.base.bias) + 2.0 * (x2 @ a.T) @ b.T
    ref.pow(2).sum().backward()
    for got, want in zip(grads, (x2.grad, a.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert layer.base.weight.grad is None  # the frozen weight never gets a gradient


def test_bias_gradient_in_fused_path():
    layer = _linear_layer()
    layer.base.bias.requires_grad_(True)
    x = torch.randn(4, 16)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.base.bias.grad, torch.full((12,), 4.0))


def test_dropout_applies_to_lora_path_only():
    layer = _linear_layer(dropout=0.5)
    _randomize(layer)
    layer.train()
    x = torch.randn(64, 16)
    ad = layer.adapters["a"]
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    mask_x = F.dropout(x, 0.5, training=True)
    expected = layer.base(x) + 2.0 * (mask_x @ ad.lora_a.T) @ ad.lora_b.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    layer.eval()  # no dropout in eval
    torch.testing.assert_close(layer(x), layer.base(x) + 2.0 * (x @ ad.lora_a.T) @ ad.lora_b.T, rtol=1e-5, atol=1e-5)


def test_dropout_gradients_fused_equal_plain():
    layer = _linear_layer(dropout=0.3)
    _randomize(layer)
    layer.train()
    x = torch.randn(8, 16, requires_grad=True)
    torch.manual_seed(3)
    layer(x).pow(2).sum().backward()
    ad = layer.adapters["a"]
    got = (x.grad.clone(), ad.lora_a.grad.clone())
    x2 = x.detach().clone().requires_grad_(True)
    a = ad.lora_a.detach().clone().requires_grad_(True)
    torch.manual_seed(3)
    xd = F.dropout(x2, 0.3, training=True)
    (F.linear(x2, layer.base.weight, layer.base.bias) + 2.0 * (xd @ a.T) @ ad.lora_b.detach().T).pow(2).sum().backward()
    torch.testing.assert_close(got[0], x2.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], a.grad, rtol=1e-5, atol=1e-4)


def test_merge_unmerge_roundtrip_and_idempotent():
    layer = _linear_layer()
    _randomize(layer, scale=0.05)  # a trained-size delta: ‖ΔW‖ about ‖W‖
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(4, 16)
    unmerged = layer(x)
    layer.merge()
    layer.merge()  # idempotent: merged once
    assert layer.merged_adapters == ["a"]
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.base(x), unmerged, rtol=0, atol=1e-5)
    layer.unmerge()
    assert (layer(x) - unmerged).abs().max() <= 1e-6
    assert (layer.base.weight - w0).abs().max() <= 1e-6


def test_merge_refuses_non_finite():
    layer = _linear_layer()
    with torch.no_grad():
        layer.adapters["a"].lora_b.fill_(float("nan"))
    w0 = layer.base.weight.clone()
    with pytest.raises(ValueError, match="NaN"):
        layer.merge()
    assert torch.equal(layer.base.weight, w0) and layer.merged_adapters == []


def test_gpt2_conv1d_fan_in_fan_out():
    torch.manual_seed(0)
    base = Conv1D(12, 16)  # nf=out, nx=in; weight (in, out)
    layer = LoraLinear(base)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (16, 12)
    layer.add_adapter("a", 4, 4, 0.0)
    layer.active_adapters = ["a"]
    _randomize(layer)
    ad = layer.adapters["a"]
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), base(x) + x @ ad.lora_a.T @ ad.lora_b.T, rtol=1e-5, atol=1e-5)
    assert layer.delta_weight("a").shape == base.weight.shape
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(base(x), before, rtol=1e-5, atol=1e-5)


def test_embedding_closed_form_and_init():
    torch.manual_seed(0)
    base = nn.Embedding(50, 8, padding_idx=0)
    layer = LoraEmbedding(base)
    layer.add_adapter("a", 4, 8, 0.1)
    layer.active_adapters = ["a"]
    ad = layer.adapters["a"]
    assert torch.count_nonzero(ad.lora_a) == 0 and isinstance(ad.dropout, nn.Identity)
    ids = torch.randint(0, 50, (3, 6))
    assert torch.equal(layer(ids), base(ids))
    _randomize(layer)
    expected = base(ids) + 2.0 * ad.lora_a.T[ids] @ ad.lora_b.T
    torch.testing.assert_close(layer(ids), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(base(ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv_cls,shape,kernel", [(nn.Conv2d, (2, 3, 9, 9), 3), (nn.Conv1d, (2, 3, 11), 3),
                                                   (nn.Conv2d, (2, 3, 8, 8), 1)])
def test_conv_equals_conv_with_merged_kernel(conv_cls, shape, kernel):
    torch.manual_seed(0)
    base = conv_cls(3, 5, kernel, stride=2, padding=1, dilation=1)
    layer = LoraConv(base)
    layer.add_adapter("a", 2, 4, 0.0)
    layer.active_adapters = ["a"]
    x = torch.randn(*shape)
    assert torch.equal(layer(x), base(x))
    _randomize(layer)
    delta = layer.delta_weight("a")
    assert delta.shape == base.weight.shape
    expected = base._conv_forward(x, base.weight + delta, base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_lstm_raw_parameter_lora():
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 5, batch_first=True)
    inner = LoraParameter(lstm, "weight_ih_l0")
    inner.add_adapter("a", 2, 4, 0.0)
    inner.active_adapters = ["a"]
    outer = LoraParameter(inner, "weight_hh_l0")
    outer.add_adapter("a", 3, 3, 0.0)
    outer.active_adapters = ["a"]
    x = torch.randn(2, 4, 6)
    ref_out, _ = lstm(x)
    out, _ = outer(x)
    torch.testing.assert_close(out, ref_out)  # B = 0: unchanged
    _randomize(inner, 1)
    _randomize(outer, 2)
    ref = nn.LSTM(6, 5, batch_first=True)
    ref.load_state_dict(lstm.state_dict())
    with torch.no_grad():
        ref.weight_ih_l0 += inner.delta_weight("a")
        ref.weight_hh_l0 += outer.delta_weight("a")
    torch.testing.assert_close(outer(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
    # gradients reach both adapters, never the LSTM weights
    outer(x)[0].sum().backward()
    assert inner.adapters["a"].lora_b.grad.abs().sum() > 0 and outer.adapters["a"].lora_a.grad.abs().sum() > 0
    assert lstm.weight_ih_l0.grad is None
    outer.merge()
    inner.merge()
    torch.testing.assert_close(lstm(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)


def test_gru_raw_parameter():
    torch.manual_seed(0)
    gru = nn.GRU(4, 3)
    layer = LoraParameter(gru, "weight_hh_l0")
    layer.add_adapter("a", 2, 2, 0.0, init=False)
    layer.active_adapters = ["a"]
    x = torch.randn(5, 2, 4)
    ref = nn.GRU(4, 3)
    ref.load_state_dict(gru.state_dict())
    with torch.no_grad():
        ref.weight_hh_l0 += layer.delta_weight("a")
    torch.testing.assert_close(layer(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)


def test_bf16_base_gets_fp32_adapters_and_output_dtype_kept():
    base = nn.Linear(8, 4).to(torch.bfloat16)
    layer = LoraLinear(base)
    layer.add_adapter("a", 2, 2, 0.0, init=False)
    layer.active_adapters = ["a"]
    assert layer.adapters["a"].lora_a.dtype == torch.float32
    out = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_no_grad_fast_path_is_bit_identical_to_the_general_path(dtype, bias):
    """Without autograd a single plain adapter takes LoraLinear's in-place path (decode steps).

    Its output must equal the general path's ``(base(x) + (x·Aᵀ·Bᵀ)·s).to(dtype)`` bit for bit,
    which is PEFT's order of operations, and must leave the base layer's own output untouched.
    """
    layer = _linear_layer(in_f=24, out_f=20, rank=4, alpha=6.0, bias=bias).to(dtype)
    layer.adapters.float()  # fp32 factors on a half-precision base, as LoRA keeps them
    _randomize(layer, scale=0.5)
    layer.eval()
    x = torch.randn(3, 5, 24).to(dtype)
    with torch.no_grad():
        fast = layer(x)
        base_out = layer.base(x)
    with torch.enable_grad():  # eval mode and an input without grad: the general path
        general = layer(x)
    a, b, s = layer.adapters["a"].lora_a, layer.adapters["a"].lora_b, layer.adapters["a"].scaling
    expected = (base_out + F.linear(F.linear(x.float(), a), b) * s).to(dtype)
    assert fast.dtype == dtype
    assert torch.equal(fast, general.detach())
    assert torch.equal(fast, expected)
    with torch.no_grad():
        assert torch.equal(layer.base(x), base_out)  # the in-place add never wrote into anything shared


def test_no_grad_fast_path_steps_aside_for_merged_disabled_and_several_adapters():
    layer = _linear_layer(in_f=8, out_f=6, rank=2, alpha=2.0)
    layer.add_adapter("b", 2, 2.0)
    _randomize(layer)
    x = torch.randn(4, 8)
    with torch.no_grad():
        one = layer(x)
        layer.active_adapters = ["a", "b"]
        both = layer(x)
        layer.merge(["a"])
        assert torch.allclose(layer(x), both, atol=1e-5)  # a merged, b on top: not counted twice
        layer.unmerge()  # W + ΔW - ΔW: equal to W up to fp32 rounding, so compare with the base as it is now
        layer.disabled = True
        assert torch.equal(layer(x), layer.base(x))
    ab, bb, sb = layer.adapters["b"].lora_a, layer.adapters["b"].lora_b, layer.adapters["b"].scaling
    assert torch.equal(both, one + (x @ ab.T @ bb.T) * sb)


def test_no_grad_paths_leave_a_hooked_base_output_untouched():
    """A forward hook on the base (activation caching) keeps the base's own output: the fast paths add out of place."""
    from lorakit.core.routing import RowRouting

    layer = _linear_layer(in_f=8, out_f=6, rank=2, alpha=4.0)
    layer.add_adapter("b", 2, 4.0)
    _randomize(layer)
    layer.eval()
    seen = []
    layer.base.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected_base = F.linear(x, layer.base.weight, layer.base.bias)
        single = layer(x)
        layer.routing = RowRouting(["a", "a", "a"])  # one adapter on every row: the pool's single-slot path
        routed = layer(x)
        layer.routing = RowRouting(["a", "b", None])  # grouped at this shape
        mixed = layer(x)
        layer.routing = None
    assert len(seen) == 3
    for out in seen:
        assert torch.equal(out, expected_base)
    assert not torch.equal(single, expected_base) and torch.allclose(routed, single, atol=1e-6)
    assert torch.equal(mixed[2], expected_base[2])
