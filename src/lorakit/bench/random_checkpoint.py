"""Random Llama checkpoints and LoRA adapters of any size, written tensor by tensor (never the whole model
in memory): inputs for the merge-memory benchmark (benchmarks/bench_merge_memory.py) and its capped test."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.core.adapter_weights import peft_key


def random_llama(folder: Path, hidden: int, layers: int, shard: str | int, vocab: int = 32000, seed: int = 0) -> int:
    """A random fp32 Llama checkpoint written tensor by tensor (never the whole model in memory); its bytes."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.quant.loading import empty_weights

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1),
                         vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False)
    with empty_weights():
        skeleton = LlamaForCausalLM(config)
    state = skeleton.state_dict()
    split = split_torch_state_dict_into_shards(state, max_shard_size=shard)
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: torch.randn(state[n].shape, generator=gen) * 0.02 for n in names}, folder / filename,
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    return sum(t.numel() * 4 for t in state.values())


def random_adapter(folder: Path, hidden: int, layers: int, rank: int = 16, seed: int = 1) -> None:
    """A PEFT-format LoRA on every Linear of every layer, random A and B."""
    import torch
    from safetensors.torch import save_file

    inter = int(hidden * 2.75)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for name, (out_f, in_f) in shapes.items():
            path = f"model.layers.{i}.{name}"
            tensors[peft_key(path, "linear", "lora_a")] = torch.randn(rank, in_f, generator=gen) * 0.02
            tensors[peft_key(path, "linear", "lora_b")] = torch.randn(out_f, rank, generator=gen) * 0.02
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "task_type": "CAUSAL_LM",
              "target_modules": sorted({n.split(".")[-1] for n in shapes}), "lora_dropout": 0.0, "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
