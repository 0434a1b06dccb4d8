"""The benchmark harness itself: interleaving, ratios and target checks."""

from __future__ import annotations

import json

import pytest

from lorakit.bench import core, suite
from lorakit.cli import main


def test_interleaved_runs_every_fn_in_rounds():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b")}
    timings = core.interleaved(fns, repeats=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then A B A B A B
    assert all(len(t.times) == len(t.cpu_times) == 3 and t.min <= t.median for t in timings.values())
    assert all(0 <= t.cpu_min for t in timings.values())


def test_row_ratio_and_targets():
    assert suite.Row("x", 1.05, 1.0, "floor", "<= 1.08").met is True
    assert suite.Row("x", 1.10, 1.0, "floor", "<= 1.08").met is False
    assert suite.Row("x", 0.95, 1.0, "one", ">= 0.90").met is True
    assert suite.Row("x", 1.0, 2.0, "ref", "").met is None
    assert suite.Row("x", 1.0, 4.0, "ref", "").ratio == 0.25


def test_bench_cli_loading_section_writes_json(tmp_path, monkeypatch):
    original = suite.adapter_loading
    monkeypatch.setattr(suite, "adapter_loading", lambda count=50: original(count=4))
    out = tmp_path / "bench.json"
    assert main(["bench", "--only", "loading", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    figures = {row["figure"]: row for row in data["rows"]}
    assert "load adapter #4 vs #1" in figures and figures["load adapter #4 vs #1"]["ours"] > 0
    assert data["command"] and data["machine"]


def test_every_cli_command_registers_its_parser():
    from lorakit.cli import COMMANDS, build_parser

    parser = build_parser("*")
    choices = parser._subparsers._group_actions[0].choices
    assert set(choices) == set(COMMANDS)
    for name in COMMANDS:  # the real parser, not the placeholder: it has options of its own
        assert choices[name]._actions, name


def test_bench_model_runs_decode_and_serve_on_a_checkpoint_folder(tmp_path, monkeypatch):
    """--model with a (tiny) checkpoint folder: the real-model decode/serve figures come out, all positive."""
    from factories import tiny_llama
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lorakit.bench import real

    monkeypatch.setattr(real, "NEW_TOKENS", 4)
    words = ["[UNK]", "<pad>", "<s>", "</s>"] + "what is the capital of france ?".split()
    core_tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core_tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    base = tmp_path / "base"
    tiny_llama(0, eos_token_id=3, bos_token_id=2, pad_token_id=1).save_pretrained(base)
    PreTrainedTokenizerFast(tokenizer_object=core_tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(base)
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(base), "--only", "decode", "serve", "--threads", "1", "--quick",
                 "--json", str(out)]) == 0
    rows = {row["figure"]: row for row in json.loads(out.read_text())["rows"]}
    assert len(rows) == 8 and all(row["ours"] > 0 and row["reference"] > 0 for row in rows.values())
    mixed = next(row for name, row in rows.items() if "4 mixed adapters vs all rows on 1 adapter" in name)
    assert mixed["unit"] == "tok/s" and mixed["target"] == ">= 0.90"
    b16 = next(row for name, row in rows.items() if "greedy b16: engine vs generate" in name)
    assert b16["ref_name"] == "generate on merged b16" and b16["target"] == ">= 0.90"


def test_bench_rejects_sections_that_do_not_fit_the_model_choice():
    with pytest.raises(SystemExit, match="needs --model"):
        main(["bench", "--only", "decode", "--threads", "1"])


def test_mixed_section_reports_both_targets_per_shape_and_the_bytes_reference_at_one_token():
    """`lorakit bench --only mixed`: per shape, mixed vs single (<= 1.05) and vs PEFT's mixed batch (<= 1.0)
    from CPU times of one interleaved run; the rank-64 bytes reference only where rows are one token."""
    rows = suite.mixed_batches(1, shapes=((2, 3), (4, 1)))
    figures = {row.figure: row for row in rows}
    for shape in ("2 x 3", "4 x 1"):
        assert figures[f"mixed batch {shape}, 4 adapters vs 1 adapter"].target == "<= 1.05"
        assert figures[f"mixed batch {shape} vs PEFT's mixed batch"].target == "<= 1.0"
    assert [f for f in figures if "r=64" in f] == ["(mixed batch 4 x 1: 1 adapter r=64 vs r=16: 4 adapters' "
                                                   "factor bytes, no routing)"]
    assert all(row.ours > 0 and row.reference > 0 and row.wall_ratio > 0 for row in rows)
