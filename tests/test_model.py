"""LoraModel behaviour on real (tiny, random) transformers architectures."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from factories import randomize_lora, tiny_bert, tiny_gpt2, tiny_llama

import lorakit
from lorakit import AdapterError, ConfigError, LoraConfig, TargetModuleError
from lorakit.core.layers import LoraLayer, LoraLinear


def _lora_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))


def test_trainable_parameter_report_for_1024_square_linear():
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    lm = lorakit.get_lora_model(model, LoraConfig(r=8, target_modules=["0"]))
    assert lm.get_nb_trainable_parameters() == (16_384, 1_064_960)
    report = lm.trainable_parameters_report()
    assert "trainable params: 16,384" in report and "frozen params: 1,048,576" in report and "−98.4%" in report


def test_trainable_count_is_r_times_d_plus_k_per_layer(input_ids):
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # q_proj 64->64, v_proj 64->32 (2 kv heads of 16), 2 layers
    expected = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert lm.get_nb_trainable_parameters()[0] == expected
    assert {n for n, p in lm.named_parameters() if p.requires_grad} == {
        n for n, _ in lm.named_parameters() if ".adapters.default.lora_" in n}


def test_fresh_model_equals_base_exactly(input_ids):
    base = tiny_llama()
    ref = base(input_ids).logits
    lm = lorakit.get_lora_model(base, LoraConfig(r=4, target_modules="all-linear"))
    assert torch.equal(lm(input_ids).logits, ref)


def test_target_modules_suffix_regex_and_all_linear():
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    assert _lora_names(lm) == ["model.model.layers.0.self_attn.q_proj", "model.model.layers.1.self_attn.q_proj"]
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj"))
    assert _lora_names(lm) == ["model.model.layers.1.mlp.down_proj", "model.model.layers.1.mlp.up_proj"]
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    names = _lora_names(lm)
    assert len(names) == 14 and not any("lm_head" in n for n in names)  # 7 linears × 2 layers, no head


def test_all_linear_on_gpt2_and_bert_skip_heads():
    gpt = lorakit.get_lora_model(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    assert not any("lm_head" in n for n in _lora_names(gpt)) and len(_lora_names(gpt)) == 8
    bert = lorakit.get_lora_model(tiny_bert(), LoraConfig(target_modules="all-linear"))
    assert not any("classifier" in n for n in _lora_names(bert))


def test_layers_to_transform_and_patterns():
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                     rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32})
    lm = lorakit.get_lora_model(tiny_llama(), cfg)
    assert _lora_names(lm) == ["model.model.layers.1.self_attn.q_proj", "model.model.layers.1.self_attn.v_proj"]
    q = lm.model.model.layers[1].self_attn.q_proj.adapters["default"]
    v = lm.model.model.layers[1].self_attn.v_proj.adapters["default"]
    assert (q.rank, q.scaling) == (4, 8.0) and (v.rank, v.scaling) == (2, 4.0)


def test_rslora_scaling():
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert lm.model.model.layers[0].self_attn.q_proj.adapters["default"].scaling == pytest.approx(8 / 4)


def test_unmatched_target_lists_closest_names():
    with pytest.raises(TargetModuleError, match="q_proj") as err:
        lorakit.get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_prj"]))
    assert "Closest names" in str(err.value)


def test_target_of_unsupported_type_is_refused():
    with pytest.raises(TargetModuleError, match="LlamaMLP"):
        lorakit.get_lora_model(tiny_llama(), LoraConfig(target_modules=["mlp"]))


@pytest.mark.parametrize("kwargs,match", [({"r": 0}, "r must be"), ({"r": -2}, "r must be"),
                                          ({"lora_alpha": 0}, "lora_alpha"), ({"lora_dropout": 1.0}, "lora_dropout"),
                                          ({"lora_dropout": -0.1}, "lora_dropout"), ({"bias": "some"}, "bias"),
                                          ({"target_modules": "(unclosed"}, "regular expression"),
                                          ({"rank_pattern": {"q": 0}}, "rank_pattern")])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**{"target_modules": ["q_proj"], **kwargs})


@pytest.mark.parametrize("name", ["../evil", "a/b", "a.b", "", "x" * 101, "a\\b"])
def test_adapter_names_with_path_parts_are_refused(name):
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="invalid adapter name"):
        lm.add_adapter(name, LoraConfig(target_modules=["q_proj"]))


def test_named_adapters_switch_disable_delete(input_ids):
    base = tiny_llama()
    ref = base(input_ids).logits
    lm = lorakit.get_lora_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    lm.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj", "o_proj"]))
    randomize_lora(lm)
    out_a = lm(input_ids).logits
    lm.set_adapter("b")
    out_b = lm(input_ids).logits
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, ref)
    # only the active adapter trains
    assert all(p.requires_grad == (".adapters.b." in n) for n, p in lm.named_parameters() if ".adapters." in n)
    with lm.disable_adapters():
        assert torch.equal(lm(input_ids).logits, ref)
    torch.testing.assert_close(lm(input_ids).logits, out_b)
    lm.disable_adapters()
    assert torch.equal(lm(input_ids).logits, ref)
    lm.enable_adapters()
    lm.set_adapter(["a", "b"])  # several active adapters add up
    both = lm(input_ids).logits
    assert not torch.allclose(both, out_a) and not torch.allclose(both, out_b)
    lm.delete_adapter("b")
    assert lm.active_adapters == ["a"] and "o_proj" not in " ".join(_lora_names(lm))
    assert isinstance(lm.model.model.layers[0].self_attn.o_proj, nn.Linear)
    torch.testing.assert_close(lm(input_ids).logits, out_a)
    with pytest.raises(AdapterError):
        lm.set_adapter("b")


def test_merge_unmerge_and_merge_and_unload(input_ids):
    base = tiny_llama()
    lm = lorakit.get_lora_model(base, LoraConfig(r=4, target_modules="all-linear"))
    randomize_lora(lm)
    unmerged = lm(input_ids).logits
    lm.merge_adapter()
    torch.testing.assert_close(lm(input_ids).logits, unmerged, rtol=0, atol=1e-5)
    lm.unmerge_adapter()
    assert (lm(input_ids).logits - unmerged).abs().max() <= 1e-6
    plain = lm.merge_and_unload()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())
    torch.testing.assert_close(plain(input_ids).logits, unmerged, rtol=0, atol=1e-5)


def test_mixed_batch_equals_each_adapter_alone(input_ids):
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    lm.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj", "embed_tokens"]))
    randomize_lora(lm)
    names = ["b", None, "a", "b"]
    mixed = lm(input_ids, adapter_names=names).logits
    for row, name in enumerate(names):
        if name is None:
            with lm.disable_adapters():
                alone = lm(input_ids[row:row + 1]).logits
        else:
            lm.set_adapter(name)
            alone = lm(input_ids[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-5)


def test_mixed_batch_trains(input_ids):
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), "a")
    lm.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lm.set_adapter(["a", "b"])
    lm.train()
    lm(input_ids, adapter_names=["a", "a", "b", "b"]).logits.sum().backward()
    q = lm.model.model.layers[0].self_attn.q_proj
    assert q.adapters["a"].lora_b.grad.abs().sum() > 0 and q.adapters["b"].lora_a.grad.abs().sum() > 0


def test_mixed_batch_errors(input_ids):
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), "a")
    with pytest.raises(AdapterError, match="unknown adapters"):
        lm(input_ids, adapter_names=["a", "zzz", None, None])
    with pytest.raises(ValueError, match="one adapter name per row"):
        lm(input_ids, adapter_names=["a", None])


def test_mixed_batch_with_classifier_copies():
    base = tiny_bert()
    ids = torch.randint(0, 128, (4, 9))
    lm = lorakit.get_lora_model(base, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"), "a")
    lm.add_adapter("b", LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    randomize_lora(lm)
    with torch.no_grad():
        for copy_ in lm.model.classifier.copies.values():
            copy_.weight.normal_()
    mixed = lm(input_ids=ids, adapter_names=["a", "b", None, "a"]).logits
    for row, name in enumerate(["a", "b", None, "a"]):
        if name is None:
            with lm.disable_adapters():
                alone = lm(input_ids=ids[row:row + 1]).logits
        else:
            lm.set_adapter(name)
            alone = lm(input_ids=ids[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-5)


def test_modules_to_save_trains_a_copy():
    base = tiny_bert()
    original = base.classifier.weight.detach().clone()
    lm = lorakit.get_lora_model(base, LoraConfig(r=4, target_modules=["query"], modules_to_save=["classifier"]))
    copy_w = lm.model.classifier.copies["default"].weight
    assert copy_w.requires_grad and not lm.model.classifier.original.weight.requires_grad
    lm.train()
    lm(input_ids=torch.randint(0, 128, (2, 5)), labels=torch.tensor([0, 1])).loss.backward()
    torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=1.0).step()
    assert not torch.equal(copy_w, original) and torch.equal(lm.model.classifier.original.weight, original)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes(bias):
    lm = lorakit.get_lora_model(tiny_llama(attention_bias=True), LoraConfig(target_modules=["q_proj"], bias=bias))
    trainable_biases = sorted(n for n, p in lm.named_parameters() if p.requires_grad and n.endswith("bias"))
    if bias == "none":
        assert trainable_biases == []
    elif bias == "lora_only":
        assert trainable_biases == ["model.model.layers.0.self_attn.q_proj.base.bias",
                                    "model.model.layers.1.self_attn.q_proj.base.bias"]
    else:
        assert len(trainable_biases) == 8  # q, k, v, o biases in 2 layers


def test_weighted_adapter_cat_is_exact_and_svd_is_best_rank_k(input_ids):
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    lm.add_adapter("b", LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"]))
    randomize_lora(lm)
    lm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type="cat")
    lm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "low", combination_type="svd", svd_rank=2)
    for layer in lm.lora_layers():
        want = 0.7 * layer.delta_weight("a") + (-0.4 * layer.delta_weight("b") if "b" in layer.adapters else 0)
        torch.testing.assert_close(layer.delta_weight("mix"), want, rtol=1e-5, atol=1e-6)
        s = torch.linalg.svdvals(want)
        err = torch.linalg.matrix_norm(layer.delta_weight("low") - want)
        torch.testing.assert_close(err, s[2:].square().sum().sqrt(), rtol=1e-3, atol=1e-5)  # Eckart–Young


def test_dtype_bf16_model_forward(input_ids):
    base = tiny_llama().to(torch.bfloat16)
    lm = lorakit.get_lora_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    out = lm(input_ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_conv_and_embedding_in_a_cnn_model():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 5))
    x = torch.randn(2, 3, 6, 6)
    lm = lorakit.get_lora_model(copy.deepcopy(cnn), LoraConfig(r=2, target_modules=["0", "2", "4"]))
    assert torch.equal(lm(x), cnn(x))
    randomize_lora(lm)
    mixed = lm(x, adapter_names=[None, "default"])
    torch.testing.assert_close(mixed[0], cnn(x)[0])
    torch.testing.assert_close(mixed[1], lm(x)[1], rtol=1e-5, atol=1e-5)


def test_lstm_model_via_target_parameters():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(8, 6, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0])

    torch.manual_seed(0)
    model = Tagger()
    x = torch.randn(2, 5, 8)
    ref = model(x)
    lm = lorakit.get_lora_model(model, LoraConfig(r=2, target_modules=["head"],
                                                  target_parameters=["rnn.weight_ih_l0", "rnn.weight_hh_l0"]))
    assert torch.equal(lm(x), ref)
    assert lm.get_nb_trainable_parameters()[0] == 2 * (8 + 24) + 2 * (6 + 24) + 2 * (6 + 3)
    randomize_lora(lm)
    out = lm(x)
    lm.merge_adapter()
    torch.testing.assert_close(lm(x), out, rtol=1e-5, atol=1e-5)
    plain = lm.merge_and_unload()
    assert type(plain.rnn) is nn.LSTM
    torch.testing.assert_close(plain(x), out, rtol=1e-5, atol=1e-5)


def test_lora_layer_is_used_for_linear():
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    assert isinstance(lm.model.model.layers[0].self_attn.q_proj, LoraLinear)
    assert lm.config.hidden_size == 64  # attributes of the wrapped model are reachable


def test_mixed_batch_cache_follows_in_place_updates(input_ids):
    lm = lorakit.get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), "a")
    lm.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_lora(lm)
    names = ["a", "b", None, "b"]
    with torch.no_grad():
        first = lm(input_ids, adapter_names=names).logits
        assert torch.equal(lm(input_ids, adapter_names=names).logits, first)  # served from the cache
        for layer in lm.lora_layers():
            layer.adapters["b"].lora_b.mul_(3.0)  # e.g. a reload or an optimizer step
        second = lm(input_ids, adapter_names=names).logits
        lm.set_adapter("b")
        alone = lm(input_ids[1:2]).logits
    assert torch.equal(second[0], first[0]) and not torch.allclose(second[1], first[1])
    torch.testing.assert_close(second[1:2], alone, rtol=1e-5, atol=1e-5)


def test_a_lora_model_with_no_adapters_is_the_base_bit_for_bit_until_the_first_one(input_ids, tmp_path):
    """LoraModel(model) holds no adapters (a server starts so): the base runs unchanged, nothing is
    wrapped; the first add_adapter wraps the targets and is active, exactly as get_lora_model(model, config)."""
    base = tiny_llama()
    with torch.no_grad():
        ref = base(input_ids).logits
    empty = lorakit.LoraModel(copy.deepcopy(base))
    assert lorakit.get_lora_model(copy.deepcopy(base)).peft_config == {} and empty.peft_config == {}
    assert _lora_names(empty) == [] and not any(p.requires_grad for p in empty.parameters())
    with torch.no_grad():
        assert torch.equal(empty(input_ids).logits, ref)
        assert torch.equal(empty(input_ids, adapter_names=[None] * len(input_ids)).logits, ref)
    with pytest.raises(AdapterError, match="no adapters"):
        empty.save_pretrained(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(AdapterError, match="add_adapter or load_adapter first"):
        _ = empty.active_adapter

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    direct = lorakit.get_lora_model(copy.deepcopy(base), config)
    randomize_lora(direct, 1)
    direct.save_pretrained(tmp_path / "a")
    empty.add_adapter("default", config)
    assert empty.active_adapters == ["default"] and _lora_names(empty) == _lora_names(direct)
    assert {n for n, p in empty.named_parameters() if p.requires_grad} == {
        n for n, p in direct.named_parameters() if p.requires_grad}
    empty.load_adapter(tmp_path / "a", "loaded")
    with torch.no_grad():
        assert torch.equal(empty(input_ids, adapter_names=["loaded"] * len(input_ids)).logits,
                           direct(input_ids).logits)
    empty.delete_adapter("default")
    empty.delete_adapter("loaded")  # back to no adapters: the base modules themselves again
    assert _lora_names(empty) == [] and empty.active_adapters == []
    with torch.no_grad():
        assert torch.equal(empty(input_ids).logits, ref)


def test_the_first_adapter_loaded_into_an_empty_model_is_active_and_a_failed_one_leaves_it_empty(input_ids,
                                                                                                tmp_path):
    base = tiny_llama()
    direct = lorakit.get_lora_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["k_proj"]))
    randomize_lora(direct, 2)
    direct.save_pretrained(tmp_path / "a")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"r": 2, "target_modules": ["k_proj"]}')
    empty = lorakit.LoraModel(copy.deepcopy(base))
    with pytest.raises(lorakit.errors.AdapterLoadError):
        empty.load_adapter(tmp_path / "bad", "bad")  # no weights file
    assert empty.peft_config == {} and _lora_names(empty) == [] and empty.active_adapters == []
    empty.load_adapter(tmp_path / "a", "a")
    assert empty.active_adapters == ["a"]
    with torch.no_grad():
        assert torch.equal(empty(input_ids).logits, direct(input_ids).logits)
