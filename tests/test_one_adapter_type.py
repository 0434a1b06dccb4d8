"""The adapter type (core/adapter_weights.py) is the only place that knows PEFT's key names and the
scaling rule; its per-target ΔW and key grammar agree with the live layers and with PEFT."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lorakit
from lorakit import LoraConfig
from lorakit.core import adapter_weights as aw
from lorakit.core.layers import LoraLayer
from lorakit.core.reading import read_adapter_weights
from lorakit.core.state_dict import export_adapter_weights
from lorakit.errors import ConfigError

SRC = Path(lorakit.__file__).parent
OWNER = SRC / "core" / "adapter_weights.py"
# PEFT's key fragments: none may appear in a string literal (docstrings included) outside the owner
PEFT_NAMES = ("lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
              "trainable_tokens_delta", "token_adapter", "base_model.model", "base_layer", "original_module")


def _sources():
    files = sorted(p for p in SRC.rglob("*.py") if p != OWNER)
    assert len(files) > 50  # the walk found the package
    return files


def _mentions_alpha(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return "alpha" in node.id
    if isinstance(node, ast.Attribute):
        return "alpha" in node.attr
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _mentions_alpha(node.left) or _mentions_alpha(node.right)
    return False


def test_no_second_copy_of_peft_key_names_or_the_scaling_rule():
    names, rules = [], []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                names += [f"{path.relative_to(SRC)}:{node.lineno}: {n}" for n in PEFT_NAMES if n in node.value]
            # the rule is `alpha / something` (α/r, α/√r, α·x/(ranknum+ε)); only the owner divides alpha
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _mentions_alpha(node.left):
                rules.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert names == [], "PEFT key names outside core/adapter_weights.py:\n" + "\n".join(names)
    assert rules == [], "a scaling rule outside core/adapter_weights.py:\n" + "\n".join(rules)
    tree = ast.parse(OWNER.read_text())  # and the owner does hold them (the test looks at the right thing)
    assert any(isinstance(n, ast.Constant) and n.value == "lora_magnitude_vector" for n in ast.walk(tree))


def test_the_one_scaling_function():
    assert aw.scaling(16, 4) == 4.0 and aw.scaling(6, 9, "rslora") == 2.0
    assert aw.scaling(8, 12, "adalora") == 8 / (12 + 1e-5)
    ranknum = torch.full((1,), 12.0)  # AdaLoRA's tensor ranknum: PEFT's order, x·α first
    x = torch.randn(5)
    assert torch.equal(aw.apply_scaling(x, 8, ranknum, "adalora"), x * 8 / (ranknum + 1e-5))
    assert LoraConfig(r=9, lora_alpha=6, use_rslora=True, target_modules=["x"]).scaling_for("x") == 6 / math.sqrt(9)
    with pytest.raises(ValueError, match="unknown scaling rule"):
        aw.scaling(1, 1, "nope")


@pytest.mark.parametrize("key,expected", [
    ("base_model.model.m.q.lora_A.weight", ("m.q", "lora_a", "lora_A.weight")),
    ("m.q.lora_B.weight", ("m.q", "lora_b", "lora_B.weight")),
    ("base_model.model.emb.lora_embedding_B", ("emb", "lora_b", "lora_embedding_B")),
    ("base_model.model.q.lora_magnitude_vector", ("q", "magnitude", "lora_magnitude_vector")),
    ("base_model.model.q.lora_B.bias", ("q", "lora_b_bias", "lora_B.bias")),
    ("base_model.model.q.lora_E", ("q", "lora_e", "lora_E")),
    ("base_model.model.mha.base_layer.out_proj.lora_A.weight", ("mha", "out_a", "base_layer.out_proj.lora_A.weight")),
    ("base_model.model.rnn.base_layer.lora_A.weight", ("rnn.base_layer", "lora_a", "lora_A.weight")),
    ("base_model.model.score.weight", None),
    ("base_model.model.emb.token_adapter.trainable_tokens_delta", None),
])
def test_key_grammar_parses_what_it_writes(key, expected):
    assert aw.parse_peft_key(key) == expected
    if expected is not None:
        path, role, _ = expected
        kind = {"lora_embedding_B": "embedding"}.get(expected[2], "mha" if role.startswith("out") else "linear")
        rule = "adalora" if expected[2] == "lora_E" else "lora"
        assert aw.peft_key(path, kind, role, rule) == aw.normalise_key(key)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 6)
        self.conv = nn.Conv2d(3, 4, 3)
        self.rnn = nn.GRU(6, 5)


def _randomise(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kwargs", [dict(), dict(use_rslora=True, lora_alpha=6), dict(use_dora=True),
                                    dict(lora_bias=True, target_modules=["lin", "conv"]), dict(use_dylora=True)])
def test_target_delta_matches_the_live_layer(kwargs):
    """TargetWeights.delta() (what a streaming merge will call) = the layer's delta_weight, bit for bit."""
    torch.manual_seed(0)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["emb", "lin", "conv"], **kwargs})
    lm = lorakit.get_lora_model(_Net(), config)
    _randomise(lm)
    weights = export_adapter_weights(lm.model, "default")
    layers = {n: m for n, m in lm.model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(weights.targets) == sorted(layers)
    for path, target in weights.targets.items():
        layer = layers[path]
        expected = layer.delta_weight("default")
        assert torch.equal(target.delta(layer.base_weight()), expected), path


def test_adalora_target_delta_matches_the_live_layer():
    from lorakit.core.variants import AdaLoraConfig

    lm = lorakit.get_lora_model(_Net(), AdaLoraConfig(init_r=6, target_r=2, total_step=10, lora_alpha=4,
                                                      target_modules=["lin", "conv"]))
    _randomise(lm)
    for path, target in export_adapter_weights(lm.model, "default").targets.items():
        layer = lm.model.get_submodule(path)
        assert target.rule == "adalora"
        assert torch.equal(target.delta(layer.base_weight()), layer.delta_weight("default")), path


def test_raw_parameter_adapters_go_through_the_module_path_and_match_plain_math():
    torch.manual_seed(0)
    net = _Net()
    lm = lorakit.get_lora_model(net, LoraConfig(r=3, lora_alpha=6, use_rslora=True, init_lora_weights="gaussian",
                                                target_parameters=["rnn.weight_ih_l0"], target_modules=[]))
    _randomise(lm)
    layer = lm.model.rnn
    ad = layer.adapters["default"]
    assert ad.scaling == 6 / math.sqrt(3)  # rsLoRA reaches raw parameters through the same path
    w = layer.base_weight().detach()
    delta = ad.scaling * (ad.lora_b @ ad.lora_a).detach()
    x = torch.randn(4, 2, 6)
    with torch.no_grad():
        out = lm.model.rnn(x)[0]
        plain = torch.func.functional_call(layer.base, {"weight_ih_l0": w + delta}, (x,))[0]
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    target = export_adapter_weights(lm.model, "default").targets["rnn"]
    assert target.kind == "param" and torch.equal(target.delta(), layer.delta_weight("default"))


@pytest.mark.parametrize("kwargs", [dict(use_dora=True), dict(use_dylora=True), dict(lora_bias=True),
                                    dict(shared_a_with="x"), dict(init_lora_weights="pissa"),
                                    dict(init_lora_weights="olora")])
def test_variants_on_raw_parameters_are_refused_by_name(kwargs):
    with pytest.raises(ConfigError, match="target_parameters"):
        LoraConfig(r=2, target_parameters=["rnn.weight_ih_l0"], target_modules=[], **kwargs)


def test_a_variant_that_reaches_a_raw_parameter_is_refused_not_dropped():
    """Past the config check (a config built by hand), the construction path still refuses DoRA."""
    from lorakit.errors import TargetModuleError

    config = LoraConfig(r=2, target_parameters=["rnn.weight_ih_l0"], target_modules=[])
    object.__setattr__(config, "use_dora", True)  # bypass validation, as an old pickled config could
    with pytest.raises(TargetModuleError, match="raw parameters"):
        lorakit.get_lora_model(_Net(), config)


def test_from_folder_names_the_folder_when_it_is_broken(tmp_path):
    lorakit.get_lora_model(_Net(), LoraConfig(r=2, target_modules=["lin"])).save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(lorakit.AdapterLoadError, match="layer lin has no lora_B tensor"):
        read_adapter_weights(tmp_path)


def test_import_adapter_builds_a_layer_from_the_type():
    lm = lorakit.get_lora_model(_Net(), LoraConfig(r=2, target_modules=["lin"]))
    _randomise(lm)
    source = lm.model.lin.export_adapter("default", "lin")
    lm.add_adapter("copy", LoraConfig(r=2, target_modules=["lin"]))
    lm.model.lin.import_adapter("copy", source)
    assert torch.equal(lm.model.lin.delta_weight("copy"), lm.model.lin.delta_weight("default"))
    with pytest.raises(lorakit.errors.AdapterError, match="lora_a is"):
        lm.model.lin.import_adapter("copy", source.with_factors(torch.zeros(3, 8), torch.zeros(6, 3)))


@pytest.mark.parametrize("variant", ["plain", "dora", "adalora"])
def test_a_saved_folder_parsed_by_the_type_gives_the_live_deltas(tmp_path, variant):
    """Folder -> AdapterWeights.from_peft_state_dict: same targets, same ΔW as the live layers, and the
    type writes back exactly the keys and tensors save_pretrained wrote."""
    import json

    from safetensors.torch import load_file

    from lorakit.core.variants import AdaLoraConfig, config_class_for_peft_type

    targets = ["emb", "lin", "conv"]
    config = (AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=4, target_modules=["lin", "conv"])
              if variant == "adalora" else LoraConfig(r=4, lora_alpha=8, use_dora=variant == "dora",
                                                      target_modules=targets))
    lm = lorakit.get_lora_model(_Net(), config)
    _randomise(lm)
    lm.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    parsed = aw.AdapterWeights.from_peft_state_dict(
        tensors, config_class_for_peft_type(raw["peft_type"]).from_dict(raw), raw)
    assert set(parsed.peft_state_dict()) == set(tensors) and parsed.other == {}
    from_folder = read_adapter_weights(tmp_path)
    assert from_folder.source == tmp_path and from_folder.config == raw
    assert all(torch.equal(from_folder.peft_state_dict()[k], v) for k, v in tensors.items())
    layers = {n: m for n, m in lm.model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(parsed.targets) == sorted(layers)
    for path, target in parsed.targets.items():
        layer = layers[path]
        assert torch.equal(target.delta(layer.base_weight()), layer.delta_weight("default")), path


def test_gpt2_conv1d_mha_and_lora_bias_deltas_match_what_a_merge_adds():
    """fan_in_fan_out (GPT-2 Conv1D, DoRA too), MHA's doubled out_proj delta and lora_bias's bias delta:
    TargetWeights says what merge_adapter adds to each base tensor."""
    from transformers.pytorch_utils import Conv1D

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(6, 8)  # weight (in=8, out=6)
            self.mha = nn.MultiheadAttention(8, 2)
            self.lin = nn.Linear(8, 5)

    for config in (LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True),
                   LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True),
                   LoraConfig(r=2, lora_alpha=4, target_modules=["mha"]),
                   LoraConfig(r=2, target_modules=["lin"], lora_bias=True)):
        torch.manual_seed(0)
        lm = lorakit.get_lora_model(Net(), config)
        _randomise(lm)
        before = {k: v.detach().clone() for k, v in lm.model.state_dict().items() if ".adapters." not in k}
        weights = export_adapter_weights(lm.model, "default")
        (path, target), = weights.targets.items()
        layer = lm.model.get_submodule(path)
        base_weight = layer.base_weight().detach().clone()
        lm.merge_adapter()
        after = {k: v for k, v in lm.model.state_dict().items() if ".adapters." not in k}
        if target.kind == "mha":
            pairs = [(f"{path}.base.in_proj_weight", target.delta()),
                     (f"{path}.base.out_proj.weight", target.out_proj_delta())]
        else:
            weight_key = f"{path}.base.weight"
            pairs = [(weight_key, target.delta(base_weight))]
            if target.bias_delta() is not None:
                pairs.append((f"{path}.base.bias", target.bias_delta()))
        assert target.fan_in_fan_out == (path == "c_attn")
        for key, delta in pairs:
            assert delta.shape == before[key].shape, key
            # the merge rounds W + ΔW to fp32 (twice for MHA's out_proj): a few ulps at the weight's scale
            tol = 4 * torch.finfo(torch.float32).eps * float(after[key].abs().max())
            torch.testing.assert_close(after[key] - before[key], delta, rtol=0, atol=tol)
