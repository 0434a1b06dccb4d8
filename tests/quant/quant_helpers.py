"""Small models shared by the quantisation tests."""

import torch
import torch.nn as nn


def make_linear(in_features=96, out_features=40, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def tiny_llama(seed=0, **overrides):
    """A random LlamaForCausalLM: hidden 64, 2 layers, vocab 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()
