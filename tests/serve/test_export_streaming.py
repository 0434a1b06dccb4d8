"""The streaming `lorakit merge` writes the very files the in-memory merge writes, for every kind of adapter.

Reference: ``merge_to_checkpoint(..., streaming=False)`` (the whole base loaded, merged with
``LoraModel.merge_and_unload``, saved with ``save_pretrained``), run side by side. Files are compared
byte for byte, so keys, dtypes, tensor values, shard split, index and config all agree.
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
from factories import randomize_lora, tiny_gpt2, tiny_llama
from serve_helpers import save_base, shared_model_dirs

import lorakit
from lorakit.export import merge as export


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _adapter(base_dir: Path, folder: Path, config, seed: int = 1, model_fn=None) -> Path:
    """Every trainable tensor of the adapter random (factors, DoRA magnitudes, copies, token rows, biases)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = lorakit.get_lora_model(base, config)
    randomize_lora(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not ("lora_" in name or ".adapters." in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(folder)
    return folder


def _assert_same_output(base: Path, adapters: list[Path], tmp_path: Path, streamed: bool = True,
                        check_changed: bool = True, **kw) -> None:
    got = export.merge_to_checkpoint(base, adapters, tmp_path / "streamed", **kw)
    want = export.merge_to_checkpoint(base, adapters, tmp_path / "in_memory", streaming=False, **kw)
    assert got.streamed is streamed and not want.streamed
    assert got.files == want.files and got.dtype == want.dtype and got.dequantized_4bit == want.dequantized_4bit
    for name in got.files:
        if name != export.MERGE_INFO:
            assert filecmp.cmp(got.out_dir / name, want.out_dir / name, shallow=False), name
    if not check_changed:
        return
    from safetensors.torch import load_file

    shards = sorted(got.out_dir.glob("*.safetensors"))
    tensors = {k: v for s in shards for k, v in load_file(s).items()}
    base_tensors = {k: v for s in sorted(base.glob("*.safetensors")) for k, v in load_file(s).items()}
    changed = [k for k, v in tensors.items() if k in base_tensors and v.shape == base_tensors[k].shape
               and not torch.equal(v.to(base_tensors[k].dtype), base_tensors[k])]
    assert changed  # the adapters did change something (the comparison is not between two copies of the base)


LLAMA_CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora_dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True, use_rslora=True),
    "embedding_and_head": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "o_proj"]),
    "modules_to_save": dict(r=2, lora_alpha=4, target_modules=["k_proj"], modules_to_save=["lm_head"]),
    "trainable_tokens": dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=[3, 5, 7]),
    "rank_pattern": dict(r=2, lora_alpha=4, target_modules="all-linear", rank_pattern={"q_proj": 6},
                         layers_to_transform=[1]),
}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_streaming_equals_in_memory_llama(tmp_path, case, tied):
    base = save_base(tmp_path / "base", tie_word_embeddings=tied)
    config = lorakit.LoraConfig(task_type="CAUSAL_LM", **LLAMA_CASES[case])
    adapter = _adapter(base, tmp_path / "adapter", config)
    _assert_same_output(base, [adapter], tmp_path)


def test_streaming_equals_in_memory_weighted_bf16_sharded(tmp_path):
    dirs = shared_model_dirs()
    _assert_same_output(dirs["base"], [dirs["a"], dirs["b"], dirs["c"]], tmp_path, weights=[0.7, -0.3, 1.5],
                        dtype="bfloat16", max_shard_size="40KB")
    assert len(list((tmp_path / "streamed").glob("*.safetensors"))) > 2


def test_streaming_equals_in_memory_without_generation_config(tmp_path):
    base = save_base(tmp_path / "base")
    (base / "generation_config.json").unlink()  # from_pretrained then derives one from config.json
    adapter = _adapter(base, tmp_path / "adapter", lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    _assert_same_output(base, [adapter], tmp_path)


def test_streaming_equals_in_memory_gpt2_conv1d_with_biases(tmp_path):
    base = tmp_path / "base"
    tiny_gpt2(0).save_pretrained(base)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                bias="all", task_type="CAUSAL_LM")
    adapter = _adapter(base, tmp_path / "adapter", config)
    _assert_same_output(base, [adapter], tmp_path, dtype="float16")


def test_streaming_equals_in_memory_adalora(tmp_path):
    from lorakit.core.variants import AdaLoraConfig

    base = save_base(tmp_path / "base")
    config = AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=6, target_r=4, total_step=10, tinit=1,
                           tfinal=2, task_type="CAUSAL_LM")
    adapter = _adapter(base, tmp_path / "adapter", config)
    _assert_same_output(base, [adapter], tmp_path)


def test_pissa_is_merged_in_memory_with_the_same_result(tmp_path):
    base = save_base(tmp_path / "base")
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa",
                                task_type="CAUSAL_LM")
    adapter = _adapter(base, tmp_path / "adapter", config)
    _assert_same_output(base, [adapter], tmp_path, streamed=False)  # it rewrites the base at load: not streamed


@pytest.mark.parametrize("double_quant", [True, False])
def test_streaming_equals_in_memory_from_a_4bit_base(tmp_path, double_quant):
    from transformers import AutoModelForCausalLM

    from lorakit import quant

    dirs = shared_model_dirs()
    qmodel = quant.quantize_model(AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32), "nf4",
                                  double_quant=double_quant)
    quant.save_quantized(qmodel, tmp_path / "base4")
    assert "quantization_config" in json.loads((tmp_path / "base4" / "config.json").read_text())
    # (the packed base can't be compared with the merged weights: test_export checks the 4-bit merge's values)
    _assert_same_output(tmp_path / "base4", [dirs["a"]], tmp_path, max_shard_size="50KB", check_changed=False)


def test_an_overflowing_adapter_is_refused_and_nothing_is_written(tmp_path):
    base = save_base(tmp_path / "base")
    adapter = _adapter(base, tmp_path / "adapter", lorakit.LoraConfig(r=2, target_modules=["v_proj"]))
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if "layers.1" in k and "lora_B" in k)
    tensors[key].fill_(3e38)  # finite in the file, but B·A overflows to inf: the safe merge refuses it
    tensors[key.replace("lora_B", "lora_A")].fill_(3e38)
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(export.MergeError, match="NaN/inf"):
        export.merge_to_checkpoint(base, [adapter], tmp_path / "out", max_shard_size="20KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_tiny_llama_factory_is_what_the_cases_use():
    assert tiny_llama().config.hidden_size == 64  # the cases above stay small: each merges twice


def test_a_plan_that_fails_while_writing_falls_back_to_memory_and_an_allocation_failure_does_not(tmp_path, monkeypatch):
    from lorakit.export import streaming

    base = save_base(tmp_path / "base")
    adapter = _adapter(base, tmp_path / "adapter", lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    real_value, calls = streaming.StreamingMerge.value, []

    def failing(message):
        def value(self, name):
            calls.append(name)
            if len(calls) == 3:
                raise RuntimeError(message)
            return real_value(self, name)
        return value

    monkeypatch.setattr(streaming.StreamingMerge, "value", failing("a meta-device op this plan does not cover"))
    got = export.merge_to_checkpoint(base, [adapter], tmp_path / "fallback", max_shard_size="30KB")
    want = export.merge_to_checkpoint(base, [adapter], tmp_path / "in_memory", streaming=False, max_shard_size="30KB")
    assert not got.streamed and got.files == want.files
    for name in got.files:
        if name != export.MERGE_INFO:
            assert filecmp.cmp(got.out_dir / name, want.out_dir / name, shallow=False), name
    calls.clear()
    monkeypatch.setattr(streaming.StreamingMerge, "value", failing("DefaultCPUAllocator: can't allocate memory"))
    with pytest.raises(RuntimeError, match="allocate memory"):  # the in-memory path would need more, not less
        export.merge_to_checkpoint(base, [adapter], tmp_path / "oom", max_shard_size="30KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "fallback", "in_memory"]


@pytest.mark.slow
def test_streaming_equals_in_memory_on_the_gguf_sourced_smollm2(tmp_path):
    """The real base: converted from GGUF into lorakit's cache, tied embedding and lm_head; a LoRA on the tied
    lm_head plus trainable tokens on the tied embedding, bf16 output in shards."""
    pytest.importorskip("gguf")
    from lorakit.models import SMOLLM2, resolve_base

    base = resolve_base(SMOLLM2)
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                                trainable_token_indices=[1, 2, 5])
    adapter = _adapter(base, tmp_path / "adapter", config)
    _assert_same_output(base, [adapter], tmp_path, dtype="bfloat16", max_shard_size="100MB", check_changed=False)
