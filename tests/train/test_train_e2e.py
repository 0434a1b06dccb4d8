"""End to end: instruction-tune the tiny Llama until it reproduces the answers; the demo's quick mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.cli import main
from lorakit.train.config import load_config
from lorakit.train.generate import generate_text
from lorakit.train.model_setup import load_trained
from lorakit.train.trainer import train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
def test_tiny_llama_learns_the_answers_then_merged_generation_reproduces_them(tmp_path, capsys):
    cfg = load_config(EXAMPLES / "tiny_llama_instruction.yaml",
                      [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=100", "train.threads=1",
                       "train.eval_every=0", "train.save_every=0"])
    result = train(cfg)
    assert result.metrics["eval_loss"] < 0.05
    records = [json.loads(line) for line in (EXAMPLES / "data" / "instructions.jsonl").read_text().splitlines()]
    adapter = tmp_path / "run" / "adapter"

    unmerged, tok, meta = load_trained(adapter)
    merged, _, _ = load_trained(adapter, merge=True)
    assert meta["format"] == "instruction"
    assert not any("lora" in name for name, _ in merged.named_parameters())  # a plain Llama again
    for r in records:
        got = generate_text(merged, tok, r["instruction"], "instruction", max_new_tokens=24,
                            input_text=r.get("input", ""))
        assert got == r["output"], (r, got)
        assert generate_text(unmerged, tok, r["instruction"], "instruction", max_new_tokens=24,
                             input_text=r.get("input", "")) == got
    # the command line: greedy by default, prompts laid out as in training
    plain = [r for r in records if "input" not in r]
    capsys.readouterr()
    assert main(["generate", "--merge", "--adapter", str(adapter), *[r["instruction"] for r in plain]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{r['instruction']}\t{r['output']}" for r in plain]
    # sampling is seeded: same seed, same text
    a = generate_text(merged, tok, "Name a primary color.", "instruction", 16, temperature=1.5, top_p=0.9, seed=7)
    b = generate_text(merged, tok, "Name a primary color.", "instruction", 16, temperature=1.5, top_p=0.9, seed=7)
    assert a == b
    with pytest.raises(ValueError, match="top_p"):
        generate_text(merged, tok, "x", "instruction", 4, temperature=1.0, top_p=0.0)
    assert torch.get_num_threads() >= 1


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    assert main(["demo", "minilm", "--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("linear probe", "LoRA r=8", "full fine-tuning", "reloaded vs trained max|Δlogit| 0.00e+00",
                 "merged vs unmerged", "mixed batch"):
        assert text in out
    for task in ("docstring-topics", "word-sentiment"):
        assert (tmp_path / task / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "loss.png").is_file()
