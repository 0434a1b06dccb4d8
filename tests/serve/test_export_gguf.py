"""`lorakit merge --format gguf`: the file follows llama.cpp's Llama layout and reads back with transformers'
GGUF loader to the same logits as the unmerged adapter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from serve_helpers import save_adapter, shared_model_dirs
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit.cli import main
from lorakit.export import merge as export

gguf = pytest.importorskip("gguf")

TEXT = ("the quick brown fox jumps over the lazy dog while a model learns to merge low rank adapters into "
        "its weights and writes them to a single file that another program can read back without python")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
IDS = torch.tensor([[5, 9, 12, 40, 41, 7, 3, 60], [2, 8, 8, 70, 271, 272, 1, 0]])
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bpe_tokenizer(digits: bool = False):
    """A byte-level BPE (GPT-2 style) trained on TEXT: 256 bytes + 3 specials + learned merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                          if digits else byte_level)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([TEXT] * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = TEMPLATE
    return tok


def _base(folder: Path, tied: bool) -> Path:
    from factories import tiny_llama

    tok = bpe_tokenizer()
    # vocab 320 > the tokenizer's 300: the unused rows get "[PADi]" tokens, as llama.cpp's converter writes
    model = tiny_llama(0, vocab_size=320, initializer_range=0.2, tie_word_embeddings=tied, rms_norm_eps=1e-5)
    with torch.no_grad():  # non-trivial norms, so a swapped attn_norm / ffn_norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for tied in (False, True):
        base = _base(root / f"base-tied{tied}", tied)
        out[f"base{int(tied)}"] = base
        out[f"adapter{int(tied)}"] = save_adapter(base, root / f"adapter-tied{tied}", seed=3, r=4, targets=ALL_LINEAR)
    yield out
    torch.set_num_threads(threads)


def _lora(base_dir: Path, adapter: Path):
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return lorakit.LoraModel.from_pretrained(base, adapter).eval()


def _read_back(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_f32_gguf_reads_back_with_transformers_to_the_unmerged_logits(dirs, tmp_path):
    out = tmp_path / "merged.gguf"
    report = export.merge_to_gguf(dirs["base0"], [dirs["adapter0"]], out, gguf_type="f32")
    assert report.files == ["merged.gguf"] and report.gguf.tensors == 2 + 1 + 2 * 9  # embd, norm, head, 2 layers
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not mkstemp's 0600
    back = _read_back(out)
    # lossless: the same weights as lorakit's own merge, bit for bit, so the same logits bit for bit
    assert torch.equal(_logits(back), _logits(export.merged_model(dirs["base0"], [dirs["adapter0"]])[0]))
    # and the unmerged adapter's logits up to fp32 rounding (W + ΔW vs Wx + ΔWx, at the logits' scale)
    reference = _logits(_lora(dirs["base0"], dirs["adapter0"]))
    tol = 64 * torch.finfo(torch.float32).eps * reference.abs().max().item()
    torch.testing.assert_close(_logits(back), reference, atol=tol, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(dirs["base0"], dtype=torch.float32)
    assert not torch.allclose(_logits(back), _logits(base))  # the adapter is in there
    assert back.config.tie_word_embeddings is False and back.config.num_key_value_heads == 2
    tok, tok_back = AutoTokenizer.from_pretrained(dirs["base0"]), AutoTokenizer.from_pretrained(
        tmp_path, gguf_file=out.name)
    sample = "the lazy model <|im_end|> reads back"
    assert tok_back(sample)["input_ids"] == tok(sample)["input_ids"]
    assert len(tok(sample)["input_ids"]) < len(sample.encode())  # merges were used, not bytes
    assert tok_back.chat_template == TEMPLATE
    assert tok_back.eos_token == "<|im_end|>" and tok_back.bos_token == "<|im_start|>"


def test_file_follows_llama_cpp_layout(dirs, tmp_path):
    """Names, shapes, F32 norms, metadata, and the per-head Q/K row order llama.cpp's rotary kernel expects."""
    out = tmp_path / "m.gguf"
    export.merge_to_gguf(dirs["base0"], [dirs["adapter0"]], out, gguf_type="f32")
    merged = export.merged_model(dirs["base0"], [dirs["adapter0"]])[0].state_dict()
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(2):
        names |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v",
                                                   "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == names
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    assert list(tensors["blk.0.ffn_gate.weight"].shape) == [64, 128]  # ggml order: (in, out)

    def read(name):
        return torch.from_numpy(tensors[name].data.copy()).reshape(merged_shape(name))

    def merged_shape(name):
        return tuple(reversed([int(d) for d in tensors[name].shape]))

    for hf, heads in (("self_attn.q_proj", 4), ("self_attn.k_proj", 2)):
        w = merged[f"model.layers.1.{hf}.weight"]
        g = read(f"blk.1.attn_{hf[-6]}.weight")
        d = w.shape[0] // heads
        for h in range(heads):
            for j in range(d // 2):  # GGUF rows interleave the two rotate-half halves of each head
                assert torch.equal(g[h * d + 2 * j], w[h * d + j])
                assert torch.equal(g[h * d + 2 * j + 1], w[h * d + d // 2 + j])
    assert torch.equal(read("blk.0.attn_v.weight"), merged["model.layers.0.self_attn.v_proj.weight"])
    assert torch.equal(read("blk.1.ffn_norm.weight"), merged["model.layers.1.post_attention_layernorm.weight"])
    assert torch.equal(read("output.weight"), merged["lm_head.weight"])
    fields = {k: reader.fields[k].contents() for k in reader.fields if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 0
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.feed_forward_length"],
            fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"],
            fields["llama.rope.dimension_count"], fields["llama.vocab_size"]) == (2, 64, 128, 4, 2, 16, 320)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    tok = AutoTokenizer.from_pretrained(dirs["base0"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens[:300] == tok.convert_ids_to_tokens(list(range(300)))
    assert tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)] and set(types[300:]) == {5}
    assert [types[i] for i in range(3)] == [3, 3, 3] and set(types[3:300]) == {1}
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.parametrize("kind,cast", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_types_store_the_rounded_merged_weights(dirs, tmp_path, kind, cast):
    out = tmp_path / f"m-{kind}.gguf"
    export.merge_to_gguf(dirs["base1"], [dirs["adapter1"]], out, gguf_type=kind)
    merged = export.merged_model(dirs["base1"], [dirs["adapter1"]])[0]
    back = _read_back(out)
    assert back.config.tie_word_embeddings is True
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}
    for name, w in merged.state_dict().items():  # transformers un-permutes Q/K on read
        expected = w if w.dim() == 1 else w.to(cast).float()  # norms stay f32
        assert torch.equal(back.state_dict()[name], expected), name


def test_q8_0_within_the_format_bound(dirs, tmp_path):
    """Q8_0: 32-value blocks, scale d = absmax/127 stored as fp16, q = round(x/d) -> |x̂ - x| <= d/2 + 127·|d - d16|."""
    out = tmp_path / "m-q8.gguf"
    export.merge_to_gguf(dirs["base0"], [dirs["adapter0"]], out, gguf_type="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    merged = export.merged_model(dirs["base0"], [dirs["adapter0"]])[0]
    back = _read_back(out).state_dict()
    for name, w in merged.state_dict().items():
        if w.dim() == 1:
            assert torch.equal(back[name], w)
            continue
        blocks, got = w.reshape(-1, 32), back[name].reshape(-1, 32)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        bound = d / 2 + 127 * (d - d.half().float()).abs() + 1e-4 * d
        assert ((got - blocks).abs() <= bound).all(), name
        assert (got != blocks).any()  # it really was quantised


def test_pre_tokenizer_name_follows_the_split_rules():
    from lorakit.export.gguf import tokenizer_metadata

    assert tokenizer_metadata(bpe_tokenizer(digits=True), 300)["pre"] == "smollm"
    assert tokenizer_metadata(bpe_tokenizer(), 300)["pre"] == "gpt-2"


def test_refusals_are_clear_and_leave_nothing(dirs, tmp_path):
    from factories import tiny_gpt2

    shared = shared_model_dirs()  # word-level tokenizer
    out = tmp_path / "x.gguf"
    with pytest.raises(export.MergeError, match="byte-level BPE"):
        export.merge_to_gguf(shared["base"], [shared["a"]], out)
    gpt2_dir = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(gpt2_dir)
    bpe_tokenizer().save_pretrained(gpt2_dir)
    with pytest.raises(export.MergeError, match="Llama-family.*'gpt2'.*drop --format gguf"):
        export.merge_to_gguf(gpt2_dir, [shared["a"]], out)
    with pytest.raises(export.MergeError, match="ending in .gguf"):
        export.merge_to_gguf(dirs["base0"], [dirs["adapter0"]], tmp_path / "folder")
    with pytest.raises(export.MergeError, match="--gguf-type"):
        export.merge_to_gguf(dirs["base0"], [dirs["adapter0"]], out, gguf_type="q4_k")
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))
    out.write_text("keep me")
    with pytest.raises(export.MergeError, match="exists"):
        export.merge_to_gguf(dirs["base0"], [dirs["adapter0"]], out)
    assert out.read_text() == "keep me"


def test_cli_writes_gguf_and_rejects_dtype(dirs, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    args = ["merge", "--base", str(dirs["base0"]), "--adapter", str(dirs["adapter0"]), "--out", str(out),
            "--format", "gguf"]
    assert main(args + ["--dtype", "float16"]) == 2
    assert "--gguf-type" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--gguf-type", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert "GGUF q8_0" in printed and str(out) in printed
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
