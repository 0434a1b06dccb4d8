"""PEFT adapters through the server and `lorakit merge`: where features meet the load paths.

Every adapter (and the plain base) is served from one base model. A PiSSA/OLoRA adapter writes
its residual into the base weights and a bias="all"/"lora_only" adapter overwrites base biases:
loaded, they silently changed the base rows and every other adapter's rows of a mixed batch. A
target_parameters adapter made every batched forward fail. Mixtures dropped trainable tokens and
modules_to_save; merge --weights kept a PiSSA residual at full weight.
"""

from __future__ import annotations

import peft
import pytest
import torch
from factories import randomize_lora, tiny_llama
from tolerance import assert_close_fp32

import lorakit
from lorakit.errors import AdapterLoadError
from lorakit.serve.engine.host import forward
from lorakit.serve.loading import load_served_adapter

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
BAD = {
    # not a base rewrite, but a weight every row shares: a mixed batch can't route it (every forward failed)
    "target_parameters": dict(r=4, target_modules=[], target_parameters=["mlp.up_proj.weight"]),
    "pissa": dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"),
    "olora": dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="olora"),
    "bias_all": dict(r=4, target_modules=["v_proj"], bias="all"),
    "bias_lora_only": dict(r=4, target_modules=["q_proj", "up_proj"], bias="lora_only"),
}


def llama():
    return tiny_llama(attention_bias=True, mlp_bias=True).eval()


@pytest.mark.parametrize("case", list(BAD))
def test_a_peft_adapter_that_rewrites_the_base_is_refused_and_changes_nothing(tmp_path, case):
    pm = peft.get_peft_model(llama(), peft.LoraConfig(**BAD[case]))  # PEFT writes the folder
    randomize_lora(pm, 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if name.endswith(".bias") and p.requires_grad:
                p.add_(0.5)  # trained biases
    pm.save_pretrained(tmp_path / "bad")
    good = lorakit.get_lora_model(llama(), lorakit.LoraConfig(r=2, target_modules=["k_proj", "q_proj"]))
    randomize_lora(good, 2)
    good.save_pretrained(tmp_path / "good")

    host = lorakit.LoraModel(llama())  # no adapters yet, as the server holds it
    load_served_adapter(host, "good", tmp_path / "good", root=tmp_path)
    before = forward(host, IDS, ["good", None]).clone()
    state = {k: v.clone() for k, v in host.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="rewrites the base|overwrites the base|target_parameters"):
        load_served_adapter(host, "bad", tmp_path / "bad", root=tmp_path)
    assert list(host.peft_config) == ["good"]
    assert torch.equal(forward(host, IDS, ["good", None]), before)
    after = host.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_lora_bias_and_orthogonal_adapters_still_serve_beside_the_base(tmp_path):
    for name, kw in {"lb": dict(lora_bias=True), "orth": dict(init_lora_weights="orthogonal")}.items():
        pm = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kw))
        randomize_lora(pm, 1)
        pm.eval()
        with torch.no_grad():
            ref = pm(IDS).logits
        pm.save_pretrained(tmp_path / name)
        host = lorakit.LoraModel(llama())
        load_served_adapter(host, name, tmp_path / name, root=tmp_path)
        out = forward(host, IDS, [name, None])
        with torch.no_grad():
            base = llama()(IDS).logits
        assert_close_fp32(out[0], ref[0], reduction=128, depth=9)  # batched vs PEFT's single pass
        assert torch.equal(out[1], base[1])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merge_refuses_weights_on_a_base_rewriting_adapter_and_merges_it_at_weight_one(tmp_path, init):
    """`lorakit merge --weights` combined B·A at the weight but kept the residual W0 − s·B0·A0 at full
    weight: a silently wrong checkpoint. Weight 1 (a plain fold) stays exact."""
    from transformers import AutoModelForCausalLM

    from lorakit.export.merge import MergeError, merge_to_checkpoint

    tiny_llama().save_pretrained(tmp_path / "base")
    model = lorakit.get_lora_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"],
                                                                    init_lora_weights=init))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.mul_(3.0)
        want = model(IDS).logits
    model.save_pretrained(tmp_path / "p")
    with pytest.raises(MergeError, match="can't be combined with --weights"):
        merge_to_checkpoint(tmp_path / "base", [tmp_path / "p"], tmp_path / "out", weights=[0.5])
    assert not (tmp_path / "out").exists()
    merge_to_checkpoint(tmp_path / "base", [tmp_path / "p"], tmp_path / "out", weights=[1.0])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        # folded weights round once more than the unmerged path: fp32 rounding of the model's chained
        # reductions (hidden 64 / MLP 128, two layers)
        assert_close_fp32(merged(IDS).logits, want, reduction=128, depth=8)


@pytest.mark.parametrize("extra", [dict(trainable_token_indices=[1, 5, 9]), dict(modules_to_save=["lm_head"])],
                         ids=["trainable_tokens", "modules_to_save"])
def test_a_weighted_mixture_refuses_parts_it_would_drop(tmp_path, extra):
    """A mixture (serve's mix:NAME=W, add_weighted_adapter) combined the LoRA factors and silently left
    out the trainable-token rows / modules_to_save copy: a weight-1 mixture of one PEFT adapter gave
    other outputs than the adapter. It is refused by name now (the server answers 400)."""
    pm = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], **extra))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1)
    pm.save_pretrained(tmp_path / "a")
    host = lorakit.LoraModel(llama())  # no adapters yet, as the server holds it
    load_served_adapter(host, "a", tmp_path / "a")
    with pytest.raises(lorakit.errors.ConfigError, match=next(iter(extra))):
        host.add_weighted_adapter(["a"], [1.0], "m")
    assert list(host.peft_config) == ["a"]


def test_merge_of_lora_bias_on_a_base_without_biases_is_a_merge_error(tmp_path):
    """PEFT trains lora_bias=True on a bias-less Llama; such an adapter serves and loads, but no
    checkpoint of that architecture can hold the folded bias: a MergeError (the CLI's one-line
    error), not a raw ValueError, and no output folder."""
    from lorakit.export.merge import MergeError, merge_to_checkpoint

    tiny_llama().save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    pm.save_pretrained(tmp_path / "a")
    with pytest.raises(MergeError, match="no bias"):
        merge_to_checkpoint(tmp_path / "base", [tmp_path / "a"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
