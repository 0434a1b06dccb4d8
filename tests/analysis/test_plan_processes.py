"""`lorakit plan --processes N --parallel ddp|fsdp`: the per-process parts, against torch.chunk's shards."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lorakit
from lorakit.analysis.errors import PlanError
from lorakit.analysis.plan import PlanRequest, build_model, load_model_config, plan_memory


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory) -> str:
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("one_layer_processes")
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=515, tie_word_embeddings=False,
                architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return str(path)


def first_shard_bytes(tensor: torch.Tensor, n: int) -> int:
    """What FSDP2 keeps on rank 0: torch.chunk's first piece along dim 0."""
    return torch.chunk(tensor, n, dim=0)[0].numel() * tensor.element_size()


def test_ddp_is_the_one_process_plan_at_the_per_process_batch(one_layer):
    one = plan_memory(PlanRequest(one_layer, r=8, batch=2, seq=16))
    two = plan_memory(PlanRequest(one_layer, r=8, batch=2, seq=16, processes=2, parallel="ddp"))
    assert two.parts() == one.parts()
    assert "per process of 2 (ddp)" in two.notes[-1]


@pytest.mark.parametrize("n", [2, 3])
def test_fsdp_counts_rank_0_shards_and_the_gathered_units(one_layer, n):
    request = PlanRequest(one_layer, r=8, batch=2, seq=16)
    one = plan_memory(request)
    plan = plan_memory(dataclasses.replace(request, processes=n, parallel="fsdp"))
    torch.manual_seed(0)
    ref = lorakit.get_lora_model(build_model(load_model_config(one_layer), torch.float32, device="cpu"),
                                 lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    frozen = [p for p in ref.parameters() if not p.requires_grad]
    trainable = [p for p in ref.parameters() if p.requires_grad]
    buffers = sum(b.numel() * b.element_size() for b in ref.buffers())
    assert plan.weights_bytes == sum(first_shard_bytes(p, n) for p in frozen) + buffers
    assert plan.lora_bytes == plan.grads_bytes == sum(first_shard_bytes(p, n) for p in trainable)
    assert plan.optimizer_bytes == 2 * plan.lora_bytes + 4 * len(trainable)
    assert plan.activation_bytes == one.activation_bytes  # the same rows per process
    base = ref.model
    units = [base.model.layers[0], base.model.embed_tokens, base.lm_head]
    unit_bytes = [sum(p.numel() * p.element_size() for p in u.parameters()) for u in units]
    root = base.model.norm.weight.numel() * 4  # the only parameter outside the units
    assert plan.gather_bytes == 2 * max(unit_bytes) + unit_bytes[0] + root  # unit_bytes[0]: the block
    assert plan.total_bytes == sum(plan.parts().values())
    assert plan.weights_bytes < one.weights_bytes / n + buffers + 515 * 4  # ~1/N, the odd vocab row padded


def test_fsdp_shards_the_4bit_codes_but_not_their_scales(one_layer):
    request = PlanRequest(one_layer, r=8, batch=1, seq=8, quant="nf4", dtype="float32")
    one = plan_memory(request)
    two = plan_memory(dataclasses.replace(request, processes=2, parallel="fsdp"))
    # 4-bit layers hold n/2 bytes of codes (sharded) + n/64 scales + n/16384 fp32 (whole)
    ref = build_model(load_model_config(one_layer), torch.float32, device="meta")
    head = ref.get_output_embeddings()
    linears = [m for m in ref.modules() if type(m) is torch.nn.Linear and m is not head]
    scales = sum(-(-m.weight.numel() // 64) + 4 * -(-m.weight.numel() // (64 * 256)) for m in linears)
    codes = sum(-(-m.weight.numel() // 2) for m in linears)
    assert one.weights_bytes - two.weights_bytes == pytest.approx((one.weights_bytes - scales) / 2, abs=1024)
    assert codes / 2 < two.weights_bytes


def test_bad_process_requests():
    with pytest.raises(PlanError, match="processes must be a positive integer"):
        plan_memory(PlanRequest("tiny-llama", processes=0))
    with pytest.raises(PlanError, match="parallel must be 'ddp' or 'fsdp'"):
        plan_memory(PlanRequest("tiny-llama", processes=2, parallel="zero3"))


def test_cli_prints_the_gather_part(one_layer, capsys):
    from lorakit.cli import main

    assert main(["plan", "--model", one_layer, "--r", "4", "--batch", "1", "--seq", "8", "--processes", "2",
                 "--parallel", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "fsdp_gather" in out and "per process of 2 (fsdp)" in out
