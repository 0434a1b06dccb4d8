"""lorakit's layers on the Triton path (under the interpreter) against the same layers' CPU path.

``LORAKIT_TRITON=interpret`` (with TRITON_INTERPRET=1) is the tests' explicit opt-in that lets CPU
tensors take the code paths CUDA tensors take; ``LORAKIT_TRITON=0`` gives the PyTorch path.
"""

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton")

from tolerance import assert_close_fp32  # noqa: E402

import lorakit  # noqa: E402
from lorakit.quant import Linear4bit  # noqa: E402


class TwoLayer(nn.Module):
    def __init__(self, quantize: bool):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(48, 80), nn.Linear(80, 24, bias=False)
        if quantize:
            self.up = Linear4bit.from_linear(self.up, compute_dtype=torch.float32)
            self.down = Linear4bit.from_linear(self.down, compute_dtype=torch.float32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def lora_model(quantize: bool, adapters=("default",)):
    model = lorakit.get_lora_model(TwoLayer(quantize), lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    for i, name in enumerate(adapters[1:], 1):
        model.add_adapter(name, lorakit.LoraConfig(r=4 * (i + 1), lora_alpha=16, target_modules=["up", "down"]))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero: make every adapter do something
        for n, p in model.named_parameters():
            if "lora_b" in n or "lora_B" in n:
                p.normal_(0, 0.1)
    return model


def run_step(model, x):
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.detach(), grads


def test_qlora_training_step_matches_the_cpu_path(monkeypatch):
    model = lora_model(quantize=True)
    model.train()
    x = torch.randn(2, 7, 48)
    monkeypatch.setenv("LORAKIT_TRITON", "0")
    ref_out, ref_grads = run_step(model, x)
    monkeypatch.setenv("LORAKIT_TRITON", "interpret")
    calls = []
    from lorakit.kernels import qlora

    original = qlora.QLoraLinear.forward
    monkeypatch.setattr(qlora.QLoraLinear, "forward", staticmethod(lambda *a: calls.append(1) or original(*a)))
    out, grads = run_step(model, x)
    assert len(calls) == 2  # both 4-bit layers went through the fused Triton function
    assert_close_fp32(out, ref_out, reduction=80, depth=4)
    assert ref_grads.keys() == grads.keys() and len(grads) == 4
    for name, g in grads.items():
        assert_close_fp32(g, ref_grads[name], reduction=14 * 80, depth=6)


def test_plain_linear4bit_forward_and_input_gradient(monkeypatch):
    layer = TwoLayer(quantize=True).up
    x = torch.randn(5, 48, requires_grad=True)
    monkeypatch.setenv("LORAKIT_TRITON", "0")
    ref = layer(x)
    ref.sum().backward()
    ref_grad, x.grad = x.grad.clone(), None
    monkeypatch.setenv("LORAKIT_TRITON", "interpret")
    out = layer(x)
    out.sum().backward()
    assert_close_fp32(out, ref, reduction=48, depth=2)
    assert_close_fp32(x.grad, ref_grad, reduction=80, depth=2)


def test_mixed_batch_serving_path_is_sgmv_and_matches(monkeypatch):
    model = lora_model(quantize=False, adapters=("default", "b", "c"))
    model.eval()
    x = torch.randn(4, 3, 48)
    names = ["c", None, "default", "c"]
    monkeypatch.setenv("LORAKIT_TRITON", "0")
    with torch.no_grad():
        ref = model(x, adapter_names=names)
        singles = [model(x[i : i + 1], adapter_names=[n]) for i, n in enumerate(names)]
    monkeypatch.setenv("LORAKIT_TRITON", "interpret")
    from lorakit.kernels import serving

    calls = []
    original = serving.sgmv_add_
    monkeypatch.setattr(serving, "sgmv_add_", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        out = model(x, adapter_names=names)
    assert len(calls) == 2  # both LoRA layers took the SGMV kernels
    assert_close_fp32(out, ref, reduction=80 * 12, depth=4)
    for i, single in enumerate(singles):  # and every row equals running its adapter alone
        assert_close_fp32(out[i : i + 1], single, reduction=80 * 12, depth=4)
