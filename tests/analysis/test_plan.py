"""The planner's counts (exact), its memory parts (exact where they are formulas), and the tracer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from analysis_helpers import one_thread  # noqa: F401  (fixture)
from torch._subclasses.fake_tensor import FakeTensorMode

from lorakit.analysis.errors import PlanError
from lorakit.analysis.memtrace import LiveMemory
from lorakit.analysis.plan import (
    GIB,
    PlanRequest,
    advise,
    build_model,
    count_parameters,
    load_model_config,
    plan_memory,
)
from lorakit.core.config import LoraConfig
from lorakit.core.model import get_lora_model
from lorakit.models import TINY_LLAMA
from lorakit.train.presets import load_base


def test_r8_on_a_1024_square_layer():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    count = count_parameters(model, r=8, target=["0"])
    assert (count.trainable, count.base, count.adapted_layers) == (16_384, 1_048_576, 1)


def test_all_linear_counts_every_projection_but_the_head():
    h, i = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"]
    kv = TINY_LLAMA["num_key_value_heads"] * h // TINY_LLAMA["num_attention_heads"]  # 2 kv heads × 16
    per_layer = (h + h) + (h + kv) + (h + kv) + (h + h) + 2 * (h + i) + (i + h)  # q k v o gate up down: d + k
    plan = plan_memory(PlanRequest("tiny-llama", r=16, batch=1, seq=8))
    assert plan.trainable_params == 16 * per_layer * TINY_LLAMA["num_hidden_layers"]
    assert plan.adapted_layers == 7 * TINY_LLAMA["num_hidden_layers"]


def test_plan_and_train_mean_the_same_tiny_llama():
    """`lorakit plan --model tiny-llama` counts the model `lorakit train` builds under that name
    (they were a 256-wide and a 64-wide Llama), base and LoRA parameters alike."""
    built = load_base("tiny-llama", "causal_lm")
    for r, target in ((16, "all-linear"), (8, ["q_proj", "v_proj"])):
        plan = plan_memory(PlanRequest("tiny-llama", r=r, target=target, batch=1, seq=8))
        assert plan.base_params == sum(p.numel() for p in built.parameters())
        model = get_lora_model(load_base("tiny-llama", "causal_lm"), LoraConfig(r=r, lora_alpha=2 * r,
                                                                                 target_modules=target))
        assert plan.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert plan.adapted_layers == len(list(model.lora_layers()))


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory) -> str:
    """A one-block Llama config folder: planning it traces a quarter of tiny-llama's ops."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("one_layer")
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return str(path)


def _reference_model(model: str, dtype=torch.float32):
    return build_model(load_model_config(model), dtype)


def test_parts_follow_their_formulas(one_layer):
    plan = plan_memory(PlanRequest(one_layer, r=16, batch=2, seq=32))
    ref = _reference_model(one_layer)
    params = sum(p.numel() for p in ref.parameters())
    buffers = sum(b.numel() * b.element_size() for b in ref.buffers())
    assert plan.base_params == params
    assert plan.weights_bytes == 4 * params + buffers
    assert plan.lora_bytes == plan.grads_bytes == 4 * plan.trainable_params
    assert plan.optimizer_bytes == 2 * plan.lora_bytes + 4 * plan.adapted_layers * 2  # exp_avg, exp_avg_sq, step
    assert plan.total_bytes == sum(plan.parts().values())
    # the logits alone, (B, T, vocab) fp32, are live at the start of backward
    assert plan.activation_bytes > 2 * 32 * 512 * 4


def test_nf4_weights_are_four_bit_plus_scales(one_layer):
    plan = plan_memory(PlanRequest(one_layer, r=8, batch=1, seq=8, quant="nf4"))
    ref = _reference_model(one_layer, torch.bfloat16)
    head = ref.get_output_embeddings()
    expected = sum(b.numel() * b.element_size() for b in ref.buffers())
    for module in ref.modules():
        for name, p in module.named_parameters(recurse=False):
            if type(module) is nn.Linear and module is not head and name == "weight":
                n = p.numel()
                expected += math.ceil(n / 2) + math.ceil(n / 64) + 4 * math.ceil(n / 64 / 256)
            else:
                expected += 2 * p.numel()
    assert plan.weights_bytes == expected
    assert plan.request["dtype"] is None and "nf4" in plan.notes[0]


def test_activations_grow_with_tokens_and_shrink_with_checkpointing(one_layer):
    small = plan_memory(PlanRequest(one_layer, r=8, batch=1, seq=64))
    big = plan_memory(PlanRequest(one_layer, r=8, batch=2, seq=64))
    ckpt = plan_memory(PlanRequest(one_layer, r=8, batch=2, seq=64, grad_checkpointing=True))
    assert 1.9 < big.activation_bytes / small.activation_bytes < 2.1
    assert ckpt.activation_bytes < big.activation_bytes
    assert big.weights_bytes == ckpt.weights_bytes


def test_encoder_preset_plans_an_embedding_loss():
    plan = plan_memory(PlanRequest("minilm", r=8, target=["query", "value"], batch=2, seq=16))
    assert plan.task == "embedding" and plan.trainable_params == 6 * 2 * 8 * (384 + 384)


def test_advice_when_over_budget(one_layer):
    request = PlanRequest(one_layer, r=8, batch=4, seq=64)
    plan = plan_memory(request)
    lines = advise(request, plan, budget_gb=plan.total_bytes / 1024**3 * 0.9)
    assert lines[0].startswith("does not fit") and "largest part: activations" in lines[0]
    assert any("--batch 2" in line and "(fits)" in line for line in lines)
    assert advise(request, plan, budget_gb=100)[0].startswith("fits")


def test_bad_requests():
    with pytest.raises(PlanError, match="neither a preset"):
        plan_memory(PlanRequest("nope"))
    with pytest.raises(PlanError, match="r must be a positive integer"):
        plan_memory(PlanRequest("tiny-llama", r=0))
    with pytest.raises(PlanError, match="doesn't fit"):
        plan_memory(PlanRequest("tiny-llama", target=["no_such_layer"], seq=8))


def test_live_memory_counts_new_storages_once():
    mode = FakeTensorMode()
    with mode:
        existing = torch.empty(100)
        with LiveMemory([existing]) as tracker:
            a = torch.empty(1000)  # 4000 B
            b = a.view(10, 100)  # a view: nothing new
            existing.add_(1)  # in place on an existing tensor: nothing new
            c = torch.empty(500)  # 2000 B
            del a
            assert tracker.live == 6000  # b keeps a's storage alive
            del b
            assert tracker.live == 2000
            d = c * 2  # 2000 B
            del c, d
    assert (tracker.live, tracker.peak) == (0, 6000)


def test_advice_searches_batch_with_checkpointing(monkeypatch):
    """The advice logic on a stand-in planner: activations = batch × (1 GiB with checkpointing, else 4)."""
    from lorakit.analysis import plan as plan_module

    def fake_plan(request: PlanRequest):
        per_row = 1 if request.grad_checkpointing else 4
        return plan_module.MemoryPlan({}, "causal-lm", 1, 1, 1, GIB // 2 if request.quant else GIB, 0, 0, 0,
                                      request.batch * per_row * GIB)

    monkeypatch.setattr(plan_module, "plan_memory", fake_plan)
    request = PlanRequest("x", batch=8)
    lines = advise(request, fake_plan(request), budget_gb=3)  # 33 GiB planned
    assert lines[1:] == [
        "  --grad-checkpointing: 9.00 GiB (still too big)",
        "  --quant nf4: 32.50 GiB (still too big)",
        "  --batch 4: 17.00 GiB (still too big)",
        "  --r 8: 33.00 GiB (still too big)",
        "  --grad-checkpointing --batch 2: 3.00 GiB (fits)",
    ]
    lines = advise(request, fake_plan(request), budget_gb=1.6)
    assert lines[-1] == "  --grad-checkpointing --quant nf4 --batch 1: 1.50 GiB (fits)"
    lines = advise(request, fake_plan(request), budget_gb=0.5)
    assert lines[-1] == "  even --grad-checkpointing --quant nf4 --batch 1 needs 1.50 GiB: use a shorter --seq or a smaller model"
