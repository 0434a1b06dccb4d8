"""Mixed batches gathered per row from the factor pools, pool-served adapters, O(1) routing.

References: each row run alone through the module path (``set_adapter``), and the plain math
``W·x + s·B·A·x`` of the module adapters the served ones were extracted from.
"""

from __future__ import annotations

import pytest
import torch
from factories import randomize_lora, tiny_llama
from tolerance import assert_close_fp32

import lorakit
from lorakit.core import pooled, routing
from lorakit.core.layers import LoraLayer

# a logit is a chain of ~2 layers x (attention + MLP) reductions of length ≤ 128
REDUCTION, DEPTH = 128, 8


def _model():
    lm = lorakit.get_lora_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear"), "a")
    lm.add_adapter("b", lorakit.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"]))
    lm.add_adapter("c", lorakit.LoraConfig(r=8, target_modules=["v_proj"], use_rslora=True))
    randomize_lora(lm)
    return lm.eval()


def _alone(lm, ids, name):
    with torch.no_grad():
        if name is None:
            with lm.disable_adapters():
                return lm(ids).logits
        lm.set_adapter(name)
        return lm(ids).logits


@pytest.mark.parametrize(("cost", "padding"), [(0.0, 0.0), (4.0, 0.0), (1e9, 0.0), (4.0, float("inf")), (4.0, 2.0)],
                         ids=["rows", "model", "blocks", "grouped", "default"])
@pytest.mark.parametrize("shape", [(6, 7), (5, 1)], ids=["prefill", "decode"])
def test_gathered_mixed_batch_equals_each_row_alone(shape, cost, padding, monkeypatch):
    """Every gather (each row's own factors; the distinct adapters' blocks, masked; the rows grouped
    by adapter, one batched GEMM pair) gives each row what that row gives alone; the cost model only
    picks between them."""
    monkeypatch.setattr(routing, "GATHER_COST", cost)
    monkeypatch.setattr(routing, "GROUPED_PADDING", padding)
    monkeypatch.setattr(routing, "GROUPED_COPY", float("inf") if padding == float("inf") else 1.0)
    grouped_calls = []
    original = routing.FactorPool._grouped_forward
    monkeypatch.setattr(routing.FactorPool, "_grouped_forward",
                        lambda self, *a: grouped_calls.append(1) or original(self, *a))
    lm = _model()
    ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(0))
    names = ["a", "b", None, "c", "b", "a"][: shape[0]]
    with torch.no_grad():
        mixed = lm(ids, adapter_names=names).logits
    assert all(layer.factor_pool is not None for layer in lm.lora_layers())  # the gather path ran
    assert bool(grouped_calls) == (padding == float("inf") or (padding > 0 and shape[1] == 1))
    for row, name in enumerate(names):
        alone = _alone(lm, ids[row:row + 1], name)
        assert_close_fp32(mixed[row:row + 1], alone, reduction=REDUCTION, depth=DEPTH)
    assert not torch.allclose(mixed[0], mixed[1])  # different adapters really differ


@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (3, 6)], ids=["b1-decode", "b4-decode", "prefill"])
def test_rows_all_on_one_adapter_take_its_factors_alone_bit_identical_to_the_blocks(shape, monkeypatch):
    """Every row on one adapter (a batch-1 decode step, one tenant): the pool skips the gather and
    the mask, and gives bit for bit what the blocks gather gives, and each row what it gives alone."""
    lm = _model()
    ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(1))
    names = ["b"] * shape[0]
    calls = []
    original = routing.FactorPool._blocks
    monkeypatch.setattr(routing.FactorPool, "_blocks", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        fast = lm(ids, adapter_names=names).logits
        assert calls == []  # no layer gathered
        monkeypatch.setattr(routing.RowRouting, "only_slot", lambda self, row_slot: None)
        monkeypatch.setattr(routing, "GATHER_COST", 1e9)  # the distinct-adapter blocks, k = 1
        monkeypatch.setattr(routing, "GROUPED_PADDING", 0.0)
        blocks = lm(ids, adapter_names=names).logits
    assert calls  # the reference really took the blocks path
    assert torch.equal(fast, blocks)
    assert_close_fp32(fast, _alone(lm, ids, "b"), reduction=REDUCTION, depth=DEPTH)


def test_pool_copy_follows_in_place_changes_and_deletes():
    lm = _model()
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    names = ["a", "b", "c"]
    with torch.no_grad():
        lm(ids, adapter_names=names)
        for layer in lm.lora_layers():  # a training step would do this to the factors
            if "b" in layer.adapters:
                layer.adapters["b"].lora_b.mul_(3.0)
        after = lm(ids, adapter_names=names).logits
    assert_close_fp32(after[1:2], _alone(lm, ids[1:2], "b"), reduction=REDUCTION, depth=DEPTH)
    lm.delete_adapter("b")
    lm.add_adapter("d", lorakit.LoraConfig(r=2, target_modules=["k_proj"]))  # reuses b's slot
    randomize_lora(lm, seed=5)
    with torch.no_grad():
        got = lm(ids, adapter_names=["a", "d", "c"]).logits
    assert_close_fp32(got[1:2], _alone(lm, ids[1:2], "d"), reduction=REDUCTION, depth=DEPTH)


def test_mixed_batch_with_autograd_still_trains_through_the_factors():
    lm = _model()
    lm.set_adapter(["a", "b", "c"])  # active adapters are the trainable ones
    lm.train()
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(2))
    lm(ids, adapter_names=["a", "b", "c", None]).logits.sum().backward()
    for name in "abc":
        grads = [layer.adapters[name].lora_a.grad for layer in lm.lora_layers() if name in layer.adapters]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_served_adapter_equals_the_module_it_came_from_and_evicts_cleanly():
    lm = _model()
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(3))
    reference = {n: _alone(lm, ids, n) for n in ("a", "b", "c", None)}
    served = {n: pooled.extract_served(lm, n) for n in ("b", "c")}
    for n in ("b", "c"):
        lm.delete_adapter(n)
    for n in ("b", "c"):
        pooled.install(lm, served[n])
    with torch.no_grad():
        got = lm(ids, adapter_names=["b", "a", "c", None]).logits
    for row, name in enumerate(["b", "a", "c", None]):
        assert_close_fp32(got[row:row + 1], reference[name][row:row + 1], reduction=REDUCTION, depth=DEPTH)
    pooled.uninstall(lm, served["b"])
    with pytest.raises(lorakit.errors.AdapterError, match="unknown adapters"):
        lm(ids, adapter_names=["b", "a", "c", None])
    # c (v_proj only) takes b's freed slot: b's q/down slices must be gone, not read by c's rows
    pooled.uninstall(lm, served["c"])
    pooled.install(lm, served["c"])
    with torch.no_grad():
        got = lm(ids, adapter_names=["c", "c", "a", None]).logits
    for row, name in enumerate(["c", "c", "a", None]):
        assert_close_fp32(got[row:row + 1], reference[name][row:row + 1], reduction=REDUCTION, depth=DEPTH)


def test_served_layers_stay_wrapped_when_the_last_module_adapter_goes():
    lm = _model()
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    ref = _alone(lm, ids, "b")
    served = pooled.extract_served(lm, "b")
    lm.delete_adapter("b")
    pooled.install(lm, served)
    for n in ("a", "c"):
        lm.delete_adapter(n)
    assert not lm.peft_config and isinstance(lm.model.model.layers[0].self_attn.q_proj, LoraLayer)
    with torch.no_grad():
        got = lm(ids, adapter_names=["b", "b"]).logits
    assert_close_fp32(got, ref, reduction=REDUCTION, depth=DEPTH)


def test_pooled_mixture_is_the_weighted_sum_of_deltas():
    lm = _model()
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(5))
    lm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "m", combination_type="cat")
    ref = _alone(lm, ids, "m")
    mix = pooled.mixture("pm", [pooled.extract_served(lm, "a"), pooled.extract_served(lm, "b")], [0.7, -0.4])
    pooled.install(lm, mix)
    with torch.no_grad():
        got = lm(ids, adapter_names=["pm"]).logits
    assert_close_fp32(got, ref, reduction=REDUCTION, depth=DEPTH)


def test_variants_are_not_pool_servable():
    lm = lorakit.get_lora_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert not pooled.servable(lm, "default")
    with pytest.raises(lorakit.errors.AdapterError, match="not plain LoRA"):
        pooled.extract_served(lm, "default")


def test_routing_a_forward_touches_no_wrapper():
    """Routing sets one shared holder: the forward never walks the wrappers (210 on SmolLM2)."""
    lm = _model()
    holders = {id(m.__dict__.get("_route")) for m in lm._wrappers()}
    assert holders == {id(lm._route)}
    ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(6))

    def walked():
        raise AssertionError("a routed forward walked the wrappers")

    lm._wrappers = walked  # instance attribute shadows the method for this model only
    with torch.no_grad():
        lm(ids, adapter_names=["a", None])
    assert lm._route.current is None  # cleared after the forward


@pytest.mark.parametrize("padding", [0.0, float("inf")], ids=["rows-or-blocks", "grouped"])
def test_half_precision_base_mixed_rows_sum_in_fp32_and_round_once(padding, monkeypatch):
    """A bf16 base with fp32 factors: each routed row is (base(x) + s·x·Aᵀ·Bᵀ) summed in fp32 and rounded
    to bf16 once, like the module path; rows on no adapter keep the base output exactly."""
    import torch.nn as nn

    from lorakit.core.layers import LoraLinear

    monkeypatch.setattr(routing, "GROUPED_PADDING", padding)
    monkeypatch.setattr(routing, "GROUPED_COPY", padding)  # rows of 3 tokens: grouped only when forced
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 24).to(torch.bfloat16))
    for name, rank in (("a", 4), ("b", 2)):
        layer.add_adapter(name, rank, 2.0 * rank, init=False)
    layer.eval()
    x = torch.randn(5, 3, 32).to(torch.bfloat16)
    names = ["a", "b", None, "a", "b"]
    with torch.no_grad():
        layer.routing = routing.RowRouting(names)
        mixed = layer(x)
        layer.routing = None
        base = layer.base(x)
    assert mixed.dtype == torch.bfloat16
    for row, name in enumerate(names):
        if name is None:
            assert torch.equal(mixed[row], base[row])
            continue
        ad = layer.adapters[name]
        exact = base[row].double() + (x[row].double() @ ad.lora_a.double().T @ ad.lora_b.double().T) * ad.scaling
        # one rounding to bf16 (half an ulp) plus fp32 sums far below it: within one bf16 ulp of the exact sum
        ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        assert ((mixed[row].double() - exact).abs() <= ulp).all()


def test_grouped_padding_adds_nothing_even_when_the_padding_row_is_not_finite(monkeypatch):
    """Uneven groups are padded with reads of the group's first row, whose padded rank-r products are
    zeroed before the expansion is added back into the rows they name: every other row gets exactly
    its own delta, with an inf in the row the padding reads."""
    import torch.nn as nn

    from lorakit.core.layers import LoraLinear

    monkeypatch.setattr(routing, "GROUPED_PADDING", float("inf"))
    monkeypatch.setattr(routing, "GROUPED_COPY", float("inf"))
    grouped_calls = []
    original = routing.FactorPool._grouped_forward
    monkeypatch.setattr(routing.FactorPool, "_grouped_forward",
                        lambda self, *a: grouped_calls.append(a[-1] is not None) or original(self, *a))
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 12))
    for name in ("a", "b"):
        layer.add_adapter(name, 4, 8.0, init=False)
    layer.eval()
    x = torch.randn(5, 1, 16)
    names = ["a", "a", "a", "b", "a"]  # a: 4 rows; b: row 3 alone, padded to 4 with three reads of row 3
    x[3, 0, 3] = float("inf")
    with torch.no_grad():
        layer.routing = routing.RowRouting(names)
        mixed = layer(x)
        layer.routing = None
    assert grouped_calls == [True]  # the grouped path ran, with padding
    for row, name in enumerate(names):
        ad = layer.adapters[name]
        expected = layer.base(x[row]) + (x[row] @ ad.lora_a.T @ ad.lora_b.T) * ad.scaling
        if row == 3:
            assert not torch.isfinite(mixed[row]).all()
        else:
            assert torch.isfinite(mixed[row]).all()
            assert_close_fp32(mixed[row], expected, reduction=16, depth=2)
