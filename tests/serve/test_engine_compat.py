"""lorakit's adapter folders against what vLLM and LoRAX check when they load one (neither installed).

What they check, read off their sources:

* vLLM, ``vllm/lora/peft_helper.py`` (``PEFTHelper``): ``r``, ``lora_alpha`` and ``target_modules``
  are required; other keys are dropped; ``modules_to_save`` must be empty and ``use_dora`` false
  (``_validate_features``); ``bias`` must be ``"none"`` and ``max(r, *rank_pattern.values())`` at most
  ``--max-lora-rank`` (``validate_legal``); scaling is ``lora_alpha / r`` (``/ √r`` with
  ``use_rslora``). Its loader (``vllm/lora/models.py`` / ``utils.parse_fine_tuned_lora_name``) reads
  tensors named ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``.
* LoRAX, ``server/lorax_server/adapters/lora.py``: the config goes through PEFT's
  ``LoraConfig.from_pretrained`` and keeps ``r``, ``target_modules``, ``fan_in_fan_out``,
  ``lora_alpha``, ``use_rslora``; weights are looked up as ``base_model.model.<module>.lora_A.weight``
  / ``.lora_B.weight`` per target layer, scaled by ``lora_alpha / r`` — one ``r`` for every layer,
  so a ``rank_pattern`` / ``alpha_pattern`` is not honoured there.
"""

from __future__ import annotations

import json
import math
import re

import pytest
from factories import randomize_lora, tiny_llama
from safetensors.torch import load_file

import lorakit

KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank


def vllm_problems(config: dict, tensors: dict, max_lora_rank: int = VLLM_MAX_LORA_RANK) -> list[str]:
    """The reasons vLLM's PEFTHelper / loader would refuse this folder (empty: it loads)."""
    problems = [f"missing {k}" for k in ("r", "lora_alpha", "target_modules") if k not in config]
    if config.get("modules_to_save"):
        problems.append("modules_to_save must be None")
    if config.get("use_dora"):
        problems.append("DoRA is not supported")
    if config.get("bias", "none") != "none":
        problems.append("bias is not supported")
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        problems.append(f"rank {max(ranks)} > --max-lora-rank {max_lora_rank}")
    for key in tensors:
        match = KEY.fullmatch(key)
        if match is None:
            problems.append(f"unexpected tensor {key}")
        elif match["module"].rsplit(".", 1)[-1] not in LLAMA_LORA_MODULES:
            problems.append(f"module {match['module']} is not a LoRA target in vLLM's Llama")
    return problems


def lorax_view(folder) -> dict:
    """What LoRAX keeps of the config: PEFT's LoraConfig.from_pretrained, then five fields."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig.from_pretrained(str(folder))
    return {"r": cfg.r, "target_modules": cfg.target_modules, "fan_in_fan_out": cfg.fan_in_fan_out,
            "lora_alpha": cfg.lora_alpha, "use_rslora": getattr(cfg, "use_rslora", False)}


def _save(tmp_path, name: str, **config):
    model = lorakit.get_lora_model(tiny_llama(), lorakit.LoraConfig(**config))
    randomize_lora(model)
    model.save_pretrained(tmp_path / name)
    folder = tmp_path / name
    return folder, json.loads((folder / "adapter_config.json").read_text()), \
        load_file(folder / "adapter_model.safetensors"), model


@pytest.mark.parametrize("config", [dict(r=8, lora_alpha=16, target_modules="all-linear"),
                                    dict(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)],
                         ids=["all-linear", "qv-rslora"])
def test_plain_lorakit_adapters_pass_what_vllm_and_lorax_check(tmp_path, config):
    folder, saved, tensors, model = _save(tmp_path, "plain", **config)
    assert vllm_problems(saved, tensors) == []
    view = lorax_view(folder)
    targets = view.pop("target_modules")
    assert view == {"r": config["r"], "fan_in_fan_out": False, "lora_alpha": config["lora_alpha"],
                    "use_rslora": config.get("use_rslora", False)}
    expected = config["target_modules"]
    assert targets == (expected if isinstance(expected, str) else set(expected))
    # the scaling both engines derive from the file is the one lorakit trained with, on every layer
    derived = saved["lora_alpha"] / (math.sqrt(saved["r"]) if saved["use_rslora"] else saved["r"])
    layers = list(model.lora_layers())
    assert layers and all(abs(layer.adapters["default"].scaling - derived) < 1e-12 for layer in layers)
    # every layer's factors are found under the names both engines look up, with rank r
    for layer_path, layer in ((p, m) for p, m in model.model.named_modules() if m in layers):
        a = tensors[f"base_model.model.{layer_path}.lora_A.weight"]
        b = tensors[f"base_model.model.{layer_path}.lora_B.weight"]
        assert a.shape == (saved["r"], layer.in_features) and b.shape == (layer.out_features, saved["r"])


@pytest.mark.parametrize("config, reason", [
    (dict(r=4, target_modules=["q_proj"], use_dora=True), "DoRA"),
    (dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(r=32, target_modules=["q_proj"]), "max-lora-rank"),
    (dict(r=4, target_modules=["q_proj"], rank_pattern={"v_proj": 64}), "max-lora-rank"),
], ids=["dora", "modules_to_save", "rank", "rank_pattern"])
def test_adapters_those_engines_refuse_are_named(tmp_path, config, reason):
    """The check is not vacuous: folders vLLM would refuse are flagged, each for its own reason."""
    _, saved, tensors, _ = _save(tmp_path, "x", **config)
    problems = vllm_problems(saved, tensors)
    assert any(reason in p for p in problems), problems
