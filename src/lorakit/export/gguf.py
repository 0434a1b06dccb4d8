"""Write a (merged) Llama-family model as a single GGUF file that llama.cpp, Ollama and transformers read.

The layout follows llama.cpp's own converter for the ``llama`` architecture:

* tensor names ``token_embd``, ``blk.N.attn_q`` … ``ffn_down``, ``output_norm``, ``output`` (absent when the
  embeddings are tied);
* Q and K rows are permuted per head from transformers' rotate-half layout to llama.cpp's interleaved-pair
  layout: GGUF row ``h·D + 2j`` is HF row ``h·D + j`` and GGUF row ``h·D + 2j + 1`` is HF row ``h·D + D/2 + j``
  (D = head_dim; K uses the KV head count);
* 1-D tensors (RMSNorm weights) stay F32 whatever the file type; 2-D tensors are stored as ``gguf_type``;
* tokenizer metadata for byte-level BPE vocabularies (``tokenizer.ggml.model = "gpt2"``: tokens, token types,
  merges, special ids, ``add_bos_token``, chat template).

The tensor encoders are the ``gguf`` package's (numpy); Q8_0 is bit-exact with ggml's reference quantiser.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# --gguf-type -> (GGMLQuantizationType name, LlamaFileType name): the types the gguf package can encode
GGUF_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}
ARCHITECTURES = ("llama",)

# transformers name (after "model.layers.N.") -> llama.cpp name (after "blk.N.")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


class GGUFExportError(ValueError):
    """The model or its tokenizer can't be written as GGUF (unsupported architecture, tokenizer or type)."""


@dataclass
class GGUFReport:
    path: Path
    gguf_type: str
    tensors: int
    fallback_f16: list[str]  # 2-D tensors whose rows don't fit the quant block size, stored F16 instead
    pre_tokenizer: str


def check_exportable(config: Any) -> None:
    """Raise GGUFExportError unless `config` is a Llama layout this writer maps exactly."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(
            f"--format gguf writes Llama-family models (model_type {ARCHITECTURES}); this base is {model_type!r}. "
            "Merge to a safetensors checkpoint instead (drop --format gguf) and convert that with llama.cpp's "
            "convert_hf_to_gguf.py")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFExportError("--format gguf: Llama checkpoints with attention/MLP biases are not supported; "
                              "merge to safetensors (drop --format gguf) and convert with llama.cpp")
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(f"--format gguf: rope scaling {rope.get('rope_type')!r} is not supported (only plain "
                              "RoPE); merge to safetensors (drop --format gguf) and convert with llama.cpp")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim * heads != config.hidden_size or head_dim % 2:
        raise GGUFExportError(f"--format gguf: head_dim {head_dim} × {heads} heads != hidden_size "
                              f"{config.hidden_size}; this Llama variant is not supported")


def write_gguf(model: Any, tokenizer: Any, path: str | os.PathLike, gguf_type: str = "f16",
               name: str | None = None) -> GGUFReport:
    """Write `model` (a transformers LlamaForCausalLM, fp32) and `tokenizer` to `path` atomically."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"--gguf-type must be one of {sorted(GGUF_TYPES)}, got {gguf_type!r}")
    config = model.config
    check_exportable(config)
    tok_meta = tokenizer_metadata(tokenizer, config.vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from lorakit.io.atomic import atomic_write_file

    result = {}

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch="llama")  # creates the file: usual umask permissions
        _add_model_metadata(writer, config, gguf_type, name or path.stem)
        _add_tokenizer_metadata(writer, tok_meta)
        result["count"], result["fallback"] = _add_tensors(writer, model, gguf_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write_file(path, write)
    count, fallback = result["count"], result["fallback"]
    return GGUFReport(path=path, gguf_type=gguf_type, tensors=count, fallback_f16=fallback,
                      pre_tokenizer=tok_meta["pre"])


def _rope(config: Any) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(rope)


def _add_model_metadata(writer: Any, config: Any, gguf_type: str, name: str) -> None:
    import gguf

    heads = config.num_attention_heads
    rope = _rope(config)
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, GGUF_TYPES[gguf_type][1])))
    if gguf_type.startswith("q"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def gguf_name(hf_name: str) -> str:
    """transformers state-dict key -> llama.cpp tensor name (GGUFExportError for keys with no counterpart)."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}"
    raise GGUFExportError(f"--format gguf: no llama.cpp tensor for {hf_name!r}; this Llama variant is not supported")


def permute_rotary(weight: Any, heads: int) -> Any:
    """HF rotate-half rows -> llama.cpp interleaved pairs, per head: (heads·D, in) -> same shape.

    Within a head, row j (j < D/2) goes to 2j and row D/2 + j goes to 2j + 1.
    """
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_tensors(writer: Any, model: Any, gguf_type: str) -> tuple[int, list[str]]:
    import gguf
    import numpy as np

    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[gguf_type][0])
    tied = bool(getattr(config, "tie_word_embeddings", False))
    fallback, count = [], 0
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = gguf_name(hf_name)
        data = tensor.detach().float().cpu().numpy()
        if name.endswith("attn_q.weight"):
            data = permute_rotary(data, heads)
        elif name.endswith("attn_k.weight"):
            data = permute_rotary(data, kv_heads)
        data = np.ascontiguousarray(data)
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        elif data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            fallback.append(name)  # rows shorter than a block: llama.cpp's converter falls back the same way
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        count += 1
    if fallback:
        logger.warning("%d tensor(s) stored as F16: row length not a multiple of the %s block: %s",
                       len(fallback), gguf_type, ", ".join(fallback[:5]))
    return count, fallback


# --------------------------------------------------------------------------------------------- tokenizer
def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict:
    """llama.cpp's tokenizer fields for a byte-level BPE tokenizer (GPT-2 / SmolLM / Llama-3 style).

    Token types: 1 normal, 3 control (special added tokens), 4 user-defined (other added tokens),
    5 unused (ids the embedding has but the tokenizer doesn't, named ``[PADi]``).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("--format gguf needs a fast tokenizer (tokenizer.json) in the base folder")
    spec = json.loads(backend.to_str())
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE" or not _is_byte_level(spec):
        raise GGUFExportError(
            "--format gguf exports byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3 style); this one is "
            f"{bpe.get('type')!r} without a ByteLevel pre-tokenizer. Merge to safetensors (drop --format gguf) and "
            "convert with llama.cpp's convert_hf_to_gguf.py")
    tokens: list[str | None] = [None] * vocab_size
    types = [5] * vocab_size
    for text, index in bpe["vocab"].items():
        _place(tokens, types, index, text, 1, vocab_size)
    for added in spec.get("added_tokens", []):
        _place(tokens, types, added["id"], added["content"], 3 if added.get("special") else 4, vocab_size)
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    special = {key: getattr(tokenizer, f"{key}_token_id", None) for key in ("bos", "eos", "unk", "pad")}
    template = getattr(tokenizer, "chat_template", None)
    return {
        "tokens": tokens, "types": types, "merges": merges, "pre": _pre_tokenizer_name(spec), "special": special,
        "add_bos": special["bos"] is not None and bool(probe) and probe[0] == special["bos"],
        "add_eos": special["eos"] is not None and bool(probe) and probe[-1] == special["eos"],
        "chat_template": template if isinstance(template, str) else None,
    }


def _place(tokens: list, types: list, index: int, text: str, kind: int, vocab_size: int) -> None:
    if index >= vocab_size:
        raise GGUFExportError(f"--format gguf: token {text!r} has id {index} but the model's vocab_size is "
                              f"{vocab_size}; resize the embeddings to the tokenizer first")
    tokens[index], types[index] = text, kind


def _components(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [c for child in node.get("pretokenizers", node.get("decoders", [])) for c in _components(child)]
    return [node]


def _is_byte_level(spec: dict) -> bool:
    kinds = [c.get("type") for c in _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))]
    return "ByteLevel" in kinds


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for the pre-tokenizer this tokenizer.json describes.

    llama.cpp picks the split regex by this name; we recognise the two byte-level layouts a Llama-family
    checkpoint here can have and fall back to "default" (llama.cpp's GPT-2-like split) with a warning.
    """
    parts = _components(spec.get("pre_tokenizer"))
    kinds = [(p.get("type"), p.get("use_regex", p.get("individual_digits"))) for p in parts]
    if kinds == [("ByteLevel", True)]:
        return "gpt-2"
    if kinds == [("Digits", True), ("ByteLevel", True)]:
        return "smollm"  # digits split one by one, then GPT-2's regex (SmolLM / SmolLM2)
    logger.warning("--format gguf: pre-tokenizer %s has no llama.cpp name we recognise; writing 'default', so "
                   "llama.cpp may split text differently from transformers", [k for k, _ in kinds])
    return "default"


def _add_tokenizer_metadata(writer: Any, meta: dict) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for key, token_id in meta["special"].items():
        if token_id is not None:
            adders[key](int(token_id))
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(meta["add_eos"])
    writer.add_add_space_prefix(False)
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])
