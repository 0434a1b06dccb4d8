"""QLoRA end to end: LoRA adapters trained on a 4-bit (NF4) base."""

import pytest
import torch
from quant_helpers import tiny_llama

import lorakit
from lorakit.quant import (
    Linear4bit,
    RequantizationWarning,
    dequant_keep_budget,
    quantize_model,
    set_dequant_keep_budget,
)

# counting sequences (next token = previous + 1, mod 128) from 4 random starts
IDS = (torch.randint(0, 128, (4, 1), generator=torch.Generator().manual_seed(0)) + torch.arange(24)) % 128


def qlora_model(checkpointing=True, quantize=True):
    base = tiny_llama()
    if quantize:
        quantize_model(base, "nf4", double_quant=True, compute_dtype=torch.float32)
    if checkpointing:
        base.activation_checkpointing_enable({"use_reentrant": False})
    config = lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    model = lorakit.get_lora_model(base, config)
    model.train()
    return base, model


def count_dequantize(layer):
    """Record every dequantisation of ``layer``'s 4-bit weight."""
    calls, original = [], layer.dequantize

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer.dequantize = counted
    return calls


def train(model, steps=30, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_loss_falls_with_gradient_checkpointing_as_on_the_full_precision_base():
    base, model = qlora_model()
    layers = [m for m in base.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14
    calls = count_dequantize(layers[0])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert not any(p.requires_grad for layer in layers for p in layer.parameters())
    losses = train(model)
    # per step: forward, the checkpointed forward again in backward, then backward's own dequantisation
    assert len(calls) == 90
    assert losses[-1] < 0.8 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5]) - 4 * 0.5, losses
    full_precision = train(qlora_model(quantize=False)[1])  # plain LoRA, same seeds and data
    assert abs(losses[-1] - full_precision[-1]) < 0.05, (losses[-1], full_precision[-1])


def test_gradients_reach_lora_and_inputs_never_the_packed_weights():
    base, model = qlora_model(checkpointing=False)
    embeds = base.get_input_embeddings()(IDS).detach().requires_grad_(True)
    model(inputs_embeds=embeds, labels=IDS).loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(lora) == 2 * 14
    for name, param in lora:
        assert param.grad is not None, name
    assert any(p.grad.abs().sum() > 0 for _, p in lora)
    for layer in (m for m in base.modules() if isinstance(m, Linear4bit)):
        assert layer.weight.grad is None and not layer.weight.requires_grad
        assert layer.weight.dtype == torch.uint8


def test_merge_into_the_4bit_base_requantises_and_says_so():
    base, model = qlora_model(checkpointing=False)
    train(model, steps=5)
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
        with model.disable_adapters():
            without = model(input_ids=IDS).logits
    with pytest.warns(RequantizationWarning, match="re-quantised"):
        model.merge_adapter()
    with torch.no_grad():
        merged = model(input_ids=IDS).logits
    assert not torch.equal(merged, unmerged)  # a second rounding to 4 bits
    error = (merged - unmerged).norm()
    assert error < 0.2 * unmerged.norm()  # 4-bit rounding noise (≈0.10 here) ...
    assert error < 0.25 * (without - unmerged).norm()  # ... far below what the adapter changed (≈1.05)
    assert all(isinstance(m.weight, torch.Tensor) and m.weight.dtype == torch.uint8 for m in base.modules()
               if isinstance(m, Linear4bit))  # fmt: skip


def test_keep_budget_skips_the_second_dequantisation_with_the_same_numbers():
    results = {}
    for budget in (0, 1 << 30):
        old = set_dequant_keep_budget(budget)
        try:
            base, model = qlora_model(checkpointing=False)
            layers = [m for m in base.modules() if isinstance(m, Linear4bit)]
            calls = count_dequantize(layers[5])  # inside the first block: its input needs a gradient
            losses = train(model, steps=3)
            assert dequant_keep_budget()[1] == 0  # every kept weight was released with its graph
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            results[budget] = (len(calls), losses, grads)
        finally:
            set_dequant_keep_budget(old)
    assert results[0][0] == 6  # forward + backward, every step
    assert results[1 << 30][0] == 3  # forward only: backward used the kept copy
    assert results[0][1] == results[1 << 30][1]  # same weights, same math: identical losses
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1 << 30][2]))


def test_keep_budget_is_a_bound():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32), compute_dtype=torch.float32)
    old = set_dequant_keep_budget(64 * 32 * 4 + 10)  # room for one dense weight, not two
    try:
        x = torch.randn(3, 64, requires_grad=True)
        y1, y2 = layer(x), layer(x)
        assert dequant_keep_budget() == (64 * 32 * 4 + 10, 64 * 32 * 4)  # the second one recomputes
        (y1.sum() + y2.sum()).backward()
        assert dequant_keep_budget()[1] == 0
        w = layer.dequantize(torch.float32)
        expected = torch.ones(3, 32) @ w * 2
        tol = 4 * 32 * torch.finfo(torch.float32).eps * float(w.abs().sum(0).max())  # fp32 sums of 32 terms
        torch.testing.assert_close(x.grad, expected, rtol=0, atol=tol)
        with pytest.raises(ValueError, match="byte count"):
            set_dequant_keep_budget(-1)
    finally:
        set_dequant_keep_budget(old)


def test_fused_4bit_step_equals_lora_on_the_dequantised_linear():
    """A 4-bit base takes the fused LoRA path with W = dequant(codes): bit-identical to LoRA on an
    nn.Linear holding exactly those values (same function, same operands)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    q = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    dense = torch.nn.Linear(96, 40)
    with torch.no_grad():
        dense.weight.copy_(q.dequantize(torch.float32))
        dense.bias.copy_(q.bias)
    dense.requires_grad_(False)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights="gaussian")
    results = []
    for base in (q, dense):
        torch.manual_seed(1)
        model = lorakit.get_lora_model(torch.nn.Sequential(base), config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_b"):
                    p.normal_(0, 0.1)
        model.train()
        x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(2), requires_grad=True)
        y = model(x)
        y.square().sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        results.append((y.detach(), x.grad, grads))
    (y4, gx4, g4), (yd, gxd, gd) = results
    assert torch.equal(y4, yd) and torch.equal(gx4, gxd)
    assert len(g4) == 2 and all(torch.equal(a, b) for a, b in zip(g4, gd))


def test_transient_dense_weights_share_one_scratch_buffer_and_stay_correct():
    """Without a keep budget, every layer's dense weight is written into one per-thread buffer (no fresh
    allocation per matmul); chained layers still get their own weight in forward and in backward."""
    from lorakit.quant.linear4bit import dense_for_step, free_dequant_scratch

    torch.manual_seed(0)
    dense = [torch.nn.Linear(64, 48), torch.nn.Linear(48, 64)]
    quant = [Linear4bit.from_linear(d, compute_dtype=torch.float32) for d in dense]
    free_dequant_scratch()
    w0, _ = dense_for_step(quant[0], torch.float32, keep=False)
    ptr = w0.data_ptr()
    assert torch.equal(w0, quant[0].dequantize(torch.float32))
    w1, kept = dense_for_step(quant[1], torch.float32, keep=False)
    assert kept is None and w1.data_ptr() == ptr  # same buffer: w0 is overwritten, as documented
    assert torch.equal(w1, quant[1].dequantize(torch.float32))
    for q, d in zip(quant, dense):  # the float reference holds exactly the dequantised values
        with torch.no_grad():
            d.weight.copy_(q.dequantize(torch.float32))
            d.bias.copy_(q.bias)
    x = torch.randn(5, 64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y = quant[1](quant[0](x))
    yr = dense[1](dense[0](xr))
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    assert torch.equal(y, yr)
    bound = 64 * torch.finfo(torch.float32).eps * float(
        (g.abs() @ dense[1].weight.abs() @ dense[0].weight.abs()).max())  # fp32 sums at the products' scale
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=bound)
    with pytest.raises(ValueError, match="contiguous"):
        quant[0].dequantize(torch.float32, out=torch.empty(10))
    free_dequant_scratch()
