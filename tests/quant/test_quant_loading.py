"""load_4bit: a model's 4-bit version built straight from its safetensors checkpoint."""

import json

import pytest
import torch
import torch.nn as nn
from quant_helpers import tiny_llama

from lorakit.quant import Linear4bit, load_4bit, quantize_model
from lorakit.quant.loading import TensorReader, checkpoint_files, empty_weights

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def checkpoint(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "fp")
    return tmp_path / "fp", model


def test_streamed_model_equals_quantising_the_loaded_model(checkpoint):
    path, model = checkpoint
    expected = quantize_model(model, "nf4", double_quant=True)
    loaded = load_4bit(path)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    names = sorted(n for n, m in loaded.named_modules() if isinstance(m, Linear4bit))
    assert names == sorted(n for n, m in expected.named_modules() if isinstance(m, Linear4bit))
    for name in names:
        assert torch.equal(loaded.get_submodule(name).weight, expected.get_submodule(name).weight)
    assert not any(p.is_meta for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected(IDS).logits)


def test_sharded_checkpoint_dtype_and_options(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_4bit(
        tmp_path / "sharded", quant_type="fp4", double_quant=False, blocksize=128,
        skip=["mlp"], compute_dtype=torch.float32, dtype=torch.float32,
    )  # fmt: skip
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear4bit) and q.quant_type == "fp4" and q.blocksize == 128
    assert not q.quant_state.nested and q.quant_state.dtype == torch.bfloat16  # remembers its source dtype
    assert type(loaded.model.layers[0].mlp.up_proj) is nn.Linear
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        assert loaded(IDS).logits.dtype == torch.float32


def test_tied_embeddings_are_tied_after_loading(tmp_path):
    tiny_llama(num_hidden_layers=1, tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    loaded = load_4bit(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_empty_weights_puts_parameters_on_meta_only():
    with empty_weights():
        model = tiny_llama()
    assert all(p.is_meta for p in model.parameters())
    rotary = model.model.rotary_emb.inv_freq
    assert not rotary.is_meta and rotary.abs().sum() > 0
    assert not nn.Linear(2, 2).weight.is_meta  # the patch is gone afterwards


def test_reader_and_errors(checkpoint, tmp_path):
    path, _ = checkpoint
    reader = TensorReader(checkpoint_files(path))
    assert "model.norm.weight" in reader and reader.get("model.norm.weight").shape == (64,)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        checkpoint_files(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gptq"):
        load_4bit(path)
    with pytest.raises(ValueError, match="power of two"):
        load_4bit(path, blocksize=100)
