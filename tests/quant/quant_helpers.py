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


class BnbDequantMismatch(UserWarning):
    """bitsandbytes' own CPU ``dequantize_4bit`` disagrees with its own quantiser's state.

    Seen with bitsandbytes 0.50.2 on AVX-512 CPUs (BENCHMARKS.md, "bitsandbytes' CPU dequantisation"):
    for some 2-D shapes whose last dimension is not a multiple of the blocksize, its kernel returns
    wrong values while the packed bytes and scales are right. The tests then hold lorakit to the
    closed form instead of to bnb's output, and report the disagreement as this warning.
    """


def closed_form_dequant(packed: torch.Tensor, state) -> torch.Tensor:
    """``code[nibble] · absmax`` in plain PyTorch, from any QuantState-like object (ours or bnb's).

    With double quantisation the block scales are first rebuilt from the nested state:
    ``absmax = state2.code[absmax_u8] · state2.absmax[block] + offset`` (all float32), exactly the
    arithmetic REFERENCES.md records; the result is cast to the state's dtype at the end.
    """
    n = state.shape.numel()
    flat = packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()  # first value: high nibble
    if state.nested:
        nested = state.state2
        block = torch.arange(state.absmax.numel()) // nested.blocksize
        absmax = nested.code[state.absmax.long()] * nested.absmax[block] + state.offset
    else:
        absmax = state.absmax.float()
    block = torch.arange(n) // state.blocksize
    return (state.code.float()[nibbles] * absmax[block]).reshape(state.shape).to(state.dtype)


def bnb_dequant_checked(bnbf, packed: torch.Tensor, state, quant_type: str) -> torch.Tensor:
    """bnb's dequantised values where they are right, else the closed form (with a warning).

    The verdict never depends on which CPU kernel bnb picked: the value returned is always the
    closed form of bnb's own packed bytes and scales, and bnb's kernel is only compared against it.
    """
    import warnings

    expected = closed_form_dequant(packed, state)
    theirs = bnbf.dequantize_4bit(packed, state, quant_type=quant_type).reshape(expected.shape)
    if not torch.equal(theirs, expected):
        err = (theirs.float() - expected.float()).abs().max().item()
        warnings.warn(
            BnbDequantMismatch(
                f"bitsandbytes' CPU dequantize_4bit disagrees with its own state for shape "
                f"{tuple(state.shape)}, blocksize {state.blocksize}, {state.dtype}, {quant_type}, "
                f"nested={state.nested} (max |diff| {err:.3g}); compared against the closed form"
            ),
            stacklevel=2,
        )
    return expected
