"""PEFT features lorakit implements: bit-identical both ways (PEFT -> lorakit -> PEFT), files unchanged.

Each case builds the same model in PEFT and lorakit, loads the same folder in both, compares the
outputs with torch.equal and the re-saved folder tensor by tensor (tests/peft_exact.py).
"""

from __future__ import annotations

import peft
import pytest
import torch
from factories import tiny_bert, tiny_gpt2, tiny_llama
from peft_exact import (
    MLP,
    ConvNet,
    GRUTagger,
    lorakit_to_peft,
    peft_to_lorakit_to_peft,
    randomize_trainable,
    run,
)
from safetensors.torch import load_file

import lorakit
import lorakit.core.variants
from lorakit import LoraConfig

X_MLP = torch.randn(5, 10, generator=torch.Generator().manual_seed(7))
X_SEQ = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(8))
X_IMG = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(9))
IDS = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(10))


def llama_bias():
    return tiny_llama(attention_bias=True, mlp_bias=True)


# ---------------------------------------------------------------------- bias modes
BIAS_CASES = {
    "mlp-lora_only": (MLP, dict(r=4, target_modules=["lin0", "lin1"], bias="lora_only"), X_MLP),
    "mlp-all": (MLP, dict(r=4, target_modules=["lin0"], bias="all"), X_MLP),
    "llama-lora_only": (llama_bias, dict(r=4, target_modules=["q_proj", "up_proj"], bias="lora_only"), IDS),
    "llama-all": (llama_bias, dict(r=4, target_modules=["v_proj"], bias="all"), IDS),
    # modules_to_save too: PEFT also saves the head's copy as modules_to_save.bias and its original
    "bert-seqcls-all": (tiny_bert, dict(r=4, target_modules=["query"], task_type="SEQ_CLS", bias="all"), IDS),
    "bert-seqcls-lora_only": (tiny_bert, dict(r=4, target_modules=["query"], task_type="SEQ_CLS",
                                              bias="lora_only"), IDS),
}


@pytest.mark.parametrize("case", sorted(BIAS_CASES))
def test_bias_modes_roundtrip_with_peft(case, tmp_path):
    make, kwargs, x = BIAS_CASES[case]
    ours = peft_to_lorakit_to_peft(make, kwargs, x, tmp_path)
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert any(k.endswith(".base_layer.bias") for k in keys)  # PEFT's spelling for a wrapped layer's bias
    lorakit_to_peft(make, kwargs, x, tmp_path / "2")
    # trained biases are base weights: merge_and_unload keeps them
    out = run(ours, x)
    assert torch.equal(run(ours.merge_and_unload(), x), out) or torch.allclose(run(ours.model, x), out, atol=1e-5)


# ---------------------------------------------------------------------- target_parameters
PARAM_CASES = {
    "gru-two-params": (GRUTagger, dict(r=2, target_modules=["head"], target_parameters=["rnn.weight_ih_l0",
                                                                                          "rnn.weight_hh_l0"]), X_SEQ),
    "gru-one-param": (GRUTagger, dict(r=3, lora_alpha=6, target_parameters=["rnn.weight_hh_l0"]), X_SEQ),
    "mlp-linear-weight": (MLP, dict(r=2, target_modules=["lin0"], target_parameters=["lin1.weight"]), X_MLP),
    # PEFT writes target_modules: [] here; lorakit refused it as "matched no module"
    "mlp-weight-empty-target-modules": (MLP, dict(r=2, target_modules=[], target_parameters=["lin1.weight"]), X_MLP),
    "mlp-weight-bias-all": (MLP, dict(r=2, target_parameters=["lin1.weight"], bias="all"), X_MLP),
    "mlp-weight-bias-lora_only": (MLP, dict(r=2, target_modules=["lin0"], target_parameters=["lin1.weight"],
                                            bias="lora_only"), X_MLP),
}


@pytest.mark.parametrize("case", sorted(PARAM_CASES))
def test_target_parameters_roundtrip_with_peft(case, tmp_path):
    make, kwargs, x = PARAM_CASES[case]
    peft_to_lorakit_to_peft(make, kwargs, x, tmp_path)
    ours, _ = lorakit_to_peft(make, kwargs, x, tmp_path / "2")
    keys = set(load_file(tmp_path / "2" / "lk" / "adapter_model.safetensors"))
    if case == "gru-two-params":  # the first parameter registered is the inner wrapper, as in PEFT
        assert {"base_model.model.rnn.lora_A.weight", "base_model.model.rnn.base_layer.lora_A.weight"} <= keys


def test_legacy_lorakit_raw_parameter_keys_still_load(tmp_path):
    from safetensors.torch import save_file

    ours = lorakit.get_lora_model(GRUTagger(), LoraConfig(r=2, target_parameters=["rnn.weight_ih_l0",
                                                                                   "rnn.weight_hh_l0"]))
    torch.manual_seed(3)
    for p in ours.parameters():
        if p.requires_grad:
            p.data.normal_()
    ours.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    rename = {"rnn.base_layer.": "rnn.weight_ih_l0.", "rnn.lora_": "rnn.weight_hh_l0.lora_"}
    old = {}
    for k, v in tensors.items():
        for a, b in rename.items():
            if a in k:
                k = k.replace(a, b)
                break
        old[k] = v
    save_file(old, tmp_path / "adapter_model.safetensors")
    again = lorakit.LoraModel.from_pretrained(GRUTagger(), tmp_path)
    assert torch.equal(run(again, X_SEQ), run(ours, X_SEQ))


# ---------------------------------------------------------------------- lora_bias
LORA_BIAS_CASES = {
    "mlp": (MLP, dict(r=4, target_modules=["lin0", "lin1"], lora_bias=True), X_MLP),
    "conv": (ConvNet, dict(r=2, target_modules=["conv", "lin"], lora_bias=True), X_IMG),
    "llama": (llama_bias, dict(r=4, target_modules=["q_proj", "o_proj"], lora_bias=True), IDS),
}


@pytest.mark.parametrize("case", sorted(LORA_BIAS_CASES))
def test_lora_bias_roundtrip_merge_unmerge_with_peft(case, tmp_path):
    make, kwargs, x = LORA_BIAS_CASES[case]
    peft_to_lorakit_to_peft(make, kwargs, x, tmp_path)
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.bias") for k in keys)
    ours, pm = lorakit_to_peft(make, kwargs, x, tmp_path / "2")
    out = run(ours, x)
    ours.merge_adapter()
    pm.merge_adapter()
    merged = run(ours, x)
    torch.testing.assert_close(merged, run(pm, x))  # same merged weights and biases as PEFT (fp32 rounding)
    torch.testing.assert_close(merged, out, rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    torch.testing.assert_close(run(ours, x), out, rtol=1e-5, atol=1e-5)
    mixed = run(ours, x, adapter_names=["default", None] + ["default"] * (x.shape[0] - 2))
    torch.testing.assert_close(mixed[0], out[0], rtol=1e-5, atol=1e-5)


def test_lora_bias_merge_without_base_bias_is_refused():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
    lm = lorakit.get_lora_model(net, LoraConfig(r=2, target_modules=["0"], lora_bias=True))
    with pytest.raises(ValueError, match="no bias"):
        lm.merge_adapter()


# ---------------------------------------------------------------------- trainable tokens
TOKEN_CASES = {
    "llama-list": (tiny_llama, dict(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 5, 9])),
    "llama-tied": (lambda: tiny_llama(tie_word_embeddings=True),
                   dict(r=4, target_modules=["v_proj"], trainable_token_indices=[0, 3])),
    "llama-dict": (tiny_llama, dict(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [2, 7]})),
    "gpt2-tied": (tiny_gpt2, dict(r=2, target_modules=["c_attn"], trainable_token_indices=[4, 6])),
}


@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
def test_trainable_tokens_roundtrip_with_peft(case, tmp_path):
    make, kwargs = TOKEN_CASES[case]
    ours = peft_to_lorakit_to_peft(make, kwargs, IDS, tmp_path)
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert any(k.endswith(".token_adapter.trainable_tokens_delta") for k in keys)
    _, pm = lorakit_to_peft(make, kwargs, IDS, tmp_path / "2")
    out = run(ours, IDS)
    with ours.disable_adapters():
        assert torch.equal(run(ours, IDS), run(make(), IDS))
    ours.merge_adapter()
    torch.testing.assert_close(run(ours, IDS), out, rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()  # the LoRA layers subtract their fp32 delta again: rounding-close
    torch.testing.assert_close(run(ours, IDS), out, rtol=1e-5, atol=1e-5)
    plain = ours.merge_and_unload()
    assert not any("Trainable" in type(m).__name__ for m in plain.modules())
    torch.testing.assert_close(run(plain, IDS), out, rtol=1e-5, atol=1e-5)


def test_trainable_tokens_train_only_their_rows_and_delete_cleanly():
    model = tiny_llama()
    weight = model.model.embed_tokens.weight.detach().clone()
    lm = lorakit.get_lora_model(model, LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3]))
    values = lm.model.model.embed_tokens.values["default"]
    assert values.requires_grad and values.shape == (1, 64)
    run(lm, IDS)
    lm.train()
    lm(input_ids=IDS).logits.sum().backward()
    assert values.grad is not None and model.model.embed_tokens.weight.grad is None
    lm.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    lm.delete_adapter("default")
    assert type(lm.model.model.embed_tokens) is torch.nn.Embedding
    assert torch.equal(lm.model.model.embed_tokens.weight, weight)


def test_trainable_tokens_and_lora_on_the_same_embedding_is_refused():
    with pytest.raises(lorakit.ConfigError, match="trainable_token_indices"):
        lorakit.get_lora_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens"],
                                                         trainable_token_indices=[1]))


# ---------------------------------------------------------------------- OLoRA / orthogonal inits
@pytest.mark.parametrize("init", ["olora", "orthogonal"])
def test_init_matches_peft_and_folders_roundtrip(init, tmp_path):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=init)
    torch.manual_seed(11)
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    torch.manual_seed(11)
    ours = lorakit.get_lora_model(tiny_llama(), LoraConfig(**kwargs))
    peft_sd = peft.get_peft_model_state_dict(pm)
    ours_sd = {k: v for k, v in lorakit.core.state_dict.get_adapter_state_dict(ours.model, "default").items()}
    assert sorted(peft_sd) == sorted(ours_sd)
    for key in peft_sd:
        assert torch.equal(peft_sd[key], ours_sd[key]), key
    assert torch.equal(run(ours.eval(), IDS), run(pm.eval(), IDS))  # same residual base for OLoRA
    peft_to_lorakit_to_peft(tiny_llama, kwargs, IDS, tmp_path)
    lorakit_to_peft(tiny_llama, kwargs, IDS, tmp_path / "2")


def test_olora_delete_and_failed_load_restore_the_base(tmp_path):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm = lorakit.get_lora_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora"))
    assert not torch.equal(lm.model.model.layers[0].self_attn.q_proj.base.weight,
                           before["model.layers.0.self_attn.q_proj.weight"])
    lm.save_pretrained(tmp_path)
    lm.add_adapter("plain", LoraConfig(r=2, target_modules=["v_proj"]))
    lm.delete_adapter("default")
    after = lm.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k in after)
    # a folder that fails half-way (a tensor of the wrong shape) leaves the base bit for bit
    from safetensors.torch import save_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = sorted(tensors)[-1]
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    fresh = tiny_llama()
    with pytest.raises(lorakit.AdapterLoadError):
        lorakit.LoraModel.from_pretrained(fresh, tmp_path)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_orthogonal_needs_an_even_rank():
    with pytest.raises(lorakit.ConfigError, match="even"):
        lorakit.get_lora_model(tiny_llama(), LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights="orthogonal"))


# ---------------------------------------------------------------------- DoRA on Linear
DORA_CASES = {
    "mlp": (MLP, dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1", "lin2"], use_dora=True), X_MLP),
    "mlp-rslora": (MLP, dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["lin0", "lin1"], use_dora=True),
                   X_MLP),
    "llama": (tiny_llama, dict(r=4, lora_alpha=32, target_modules=["q_proj", "down_proj"], use_dora=True), IDS),
    "gpt2-fan-in-fan-out": (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                            use_dora=True), IDS),
}


@pytest.mark.parametrize("case", sorted(DORA_CASES))
def test_dora_linear_bit_identical_both_ways(case, tmp_path):
    make, kwargs, x = DORA_CASES[case]
    peft_to_lorakit_to_peft(make, kwargs, x, tmp_path)
    lorakit_to_peft(make, kwargs, x, tmp_path / "2")


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dora_training_forward_with_dropout_matches_peft(kind, tmp_path):
    make, x, targets = (MLP, X_MLP, ["lin0", "lin1"]) if kind == "linear" else (ConvNet, X_IMG, ["conv"])
    kwargs = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True, lora_dropout=0.3)
    pm = peft.get_peft_model(make(), peft.LoraConfig(**kwargs))
    randomize_trainable(pm)
    pm.save_pretrained(tmp_path)
    ours = lorakit.LoraModel.from_pretrained(make(), tmp_path, is_trainable=True)
    pm.train()
    ours.train()
    torch.manual_seed(5)
    ref = pm(x)
    torch.manual_seed(5)
    assert torch.equal(ours(x), ref)  # same dropout draws, same W0·x without the bias


# ---------------------------------------------------------------------- add_weighted_adapter
def _two_adapters(tmp_path, a_kwargs, b_kwargs):
    pm = peft.get_peft_model(MLP(), peft.LoraConfig(**a_kwargs), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(**b_kwargs))
    randomize_trainable(pm)
    g = torch.Generator().manual_seed(4)  # add_adapter leaves "b" frozen: give it values too
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if ".b." in name or name.endswith(".b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.eval().requires_grad_(False)
    pm.save_pretrained(tmp_path)
    ours = lorakit.LoraModel.from_pretrained(MLP(), tmp_path / "a" if (tmp_path / "a").is_dir() else tmp_path,
                                             adapter_name="a")
    ours.load_adapter(tmp_path / "b", "b")
    return pm, ours


@pytest.mark.parametrize("combo", ["cat", "linear", "svd"])
def test_dora_adapters_combine_like_peft(combo, tmp_path):
    kwargs = dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], use_dora=True)
    pm, ours = _two_adapters(tmp_path, kwargs, dict(kwargs, lora_alpha=4))
    pm.add_weighted_adapter(["a", "b"], [0.7, 0.4], "mix", combination_type=combo)
    ours.add_weighted_adapter(["a", "b"], [0.7, 0.4], "mix", combination_type=combo)
    pm.set_adapter("mix")
    ours.set_adapter("mix")
    assert ours.peft_config["mix"].use_dora
    layer = ours.model.lin0.adapters["mix"]
    torch.testing.assert_close(layer.lora_magnitude, pm.base_model.model.lin0.lora_magnitude_vector["mix"].weight,
                               rtol=0, atol=0)  # PEFT's magnitude: the base weight's norms
    ref = run(pm, X_MLP)
    torch.testing.assert_close(run(ours, X_MLP), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_svd_with_rank_pattern_uses_the_global_max_rank_like_peft(tmp_path):
    a = dict(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], rank_pattern={"lin1": 6})
    b = dict(r=4, lora_alpha=4, target_modules=["lin0", "lin1"])
    pm, ours = _two_adapters(tmp_path, a, b)
    pm.add_weighted_adapter(["a", "b"], [1.0, -0.5], "mix", combination_type="svd")
    ours.add_weighted_adapter(["a", "b"], [1.0, -0.5], "mix", combination_type="svd")
    for name in ("lin0", "lin1"):  # every layer gets rank 6, as in PEFT (lin0 is not cut to its own 4)
        assert getattr(ours.model, name).adapters["mix"].rank == 6
        assert getattr(pm.base_model.model, name).lora_A["mix"].weight.shape[0] == 6
    pm.set_adapter("mix")
    ours.set_adapter("mix")
    ref = run(pm, X_MLP)
    torch.testing.assert_close(run(ours, X_MLP), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_linear_combination_with_different_scalings_and_a_negative_weight_matches_peft(tmp_path):
    a = dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"])
    pm, ours = _two_adapters(tmp_path, a, dict(a, lora_alpha=2))
    pm.add_weighted_adapter(["a", "b"], [0.8, -0.3], "mix", combination_type="linear")
    ours.add_weighted_adapter(["a", "b"], [0.8, -0.3], "mix", combination_type="linear")
    pm.set_adapter("mix")
    ours.set_adapter("mix")
    ref = run(pm, X_MLP)
    torch.testing.assert_close(run(ours, X_MLP), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_adapters_on_raw_parameters_must_target_the_same_set():
    lm = lorakit.get_lora_model(GRUTagger(), LoraConfig(r=2, target_parameters=["rnn.weight_ih_l0",
                                                                                 "rnn.weight_hh_l0"]))
    with pytest.raises(lorakit.ConfigError, match="same set"):
        lm.add_adapter("other", LoraConfig(r=2, target_parameters=["rnn.weight_ih_l0"]))
    lm.add_adapter("same", LoraConfig(r=3, target_parameters=["rnn.weight_hh_l0", "rnn.weight_ih_l0"]))
    with pytest.raises(lorakit.ConfigError, match="AdaLoRA|ADALORA"):
        lorakit.core.variants.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_parameters=["rnn.weight_ih_l0"])


def test_a_module_and_its_own_parameter_both_targeted_is_refused():
    with pytest.raises(lorakit.ConfigError, match="target_modules and by target_parameters"):
        lorakit.get_lora_model(MLP(), LoraConfig(r=2, target_modules=["lin1"], target_parameters=["lin1.weight"]))
    lm = lorakit.get_lora_model(MLP(), LoraConfig(r=2, target_modules=["lin1"]))
    with pytest.raises(lorakit.TargetModuleError, match="lin1.weight"):
        lm.add_adapter("p", LoraConfig(r=2, target_parameters=["lin0.weight", "lin1.weight"]))


def test_trainable_tokens_in_a_mixed_batch_match_single_adapter_runs():
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 4]),
                                "a")
    lm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [4, 7]}))
    randomize_trainable(lm)
    lm.eval()
    ids = torch.tensor([[1, 4, 7, 2], [4, 7, 1, 9], [3, 1, 4, 7]])
    singles = {}
    for name in ("a", "b"):
        lm.set_adapter(name)
        singles[name] = run(lm, ids)
    with lm.disable_adapters():
        base = run(lm, ids)
    mixed = run(lm, ids, adapter_names=["a", "b", None])
    torch.testing.assert_close(mixed[0], singles["a"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], singles["b"][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], base[2], rtol=1e-5, atol=1e-5)
    lm.set_adapter(["a", "b"])  # overlapping rows (4) can't be active together, as in PEFT
    with pytest.raises(ValueError, match="overlap"):
        run(lm, ids)


# ---------------------------------------------------------------------- the standard cases, files compared
@pytest.mark.parametrize("case", ["llama-all-linear-patterns", "gpt2-conv1d", "bert-seqcls", "llama-embed-layers",
                                  "bert-regex-save", "qwen2-rslora"])
def test_standard_cases_resave_to_the_same_files(case, tmp_path):
    from factories import MODELS
    from test_peft_parity import CASES

    kind, kwargs = CASES[case]
    peft_to_lorakit_to_peft(MODELS[kind], kwargs, IDS, tmp_path)


def test_two_token_adapters_on_a_tied_model_match_peft(tmp_path):
    make = lambda: tiny_llama(tie_word_embeddings=True)  # noqa: E731
    pm = peft.get_peft_model(make(), peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2]),
                             adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[5, 6]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in sorted(pm.named_parameters()):
            if "lora_" in _ or "trainable_tokens_delta" in _:
                p.copy_(torch.randn(p.shape, generator=g))
    pm.eval().requires_grad_(False)
    pm.save_pretrained(tmp_path)
    ours = lorakit.LoraModel.from_pretrained(make(), tmp_path / "a" if (tmp_path / "a").is_dir() else tmp_path, "a")
    ours.load_adapter(tmp_path / "b", "b")
    assert sum(type(m).__name__ == "TrainableTokens" for m in ours.modules()) == 2  # embedding + tied head
    for name in ("a", "b"):
        pm.set_adapter(name)
        ours.set_adapter(name)
        assert torch.equal(run(ours, IDS), run(pm, IDS))
