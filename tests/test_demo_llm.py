"""`lorakit demo` (the LLM job): its task data, and every stage end to end on a tiny budget (slow)."""

from __future__ import annotations

import json
import re

import pytest

from lorakit.cli import main
from lorakit.demos import exceptions_task as task
from lorakit.demos.llm import first_named


@pytest.mark.slow
def test_demo_llm_runs_every_stage(tmp_path, capsys):
    pytest.importorskip("gguf")
    pytest.importorskip("openai")
    assert main(["demo", "--steps", "2", "--held-out", "2", "--out", str(tmp_path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for stage in ("model", "data", "base", "LoRA", "QLoRA", "serve"):
        assert re.search(rf"^\[{stage}\] \d+ s", out, re.MULTILINE), stage
    for row in ("base (no adapter)", "LoRA r=8 (fp32 base)", "QLoRA r=8 (NF4 base, double quant)"):
        assert re.search(rf"^{re.escape(row)}\s+\d+\.\d%\s+\d+\.\d%\s+\d+\.\d+$", out, re.MULTILINE), row
    # the server (base + adapter in another process) answers as the trained model did in-process
    assert "the same as the in-process LoRA answer" in out
    for name in ("lora", "qlora"):
        assert (tmp_path / name / "adapter" / "adapter_model.safetensors").is_file()
    assert "stage times: model" in out
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and {"expression", "answer", "base", "lora", "qlora"} <= set(answers[0])


def test_task_labels_come_from_the_interpreter():
    assert task.label("1 / 0") == "ZeroDivisionError"
    assert task.label("[1, 2][2]") == "IndexError"
    assert task.label("{'a': 1}['b']") == "KeyError"
    assert task.label("int('x')") == "ValueError"
    assert task.label("'a' + 1") == "TypeError"
    assert task.label("'a'.push()") == "AttributeError"
    assert task.label("length('a')") == "NameError"
    assert task.label("len('abc')") == task.NO_ERROR
    train = task.make_split(200, seed=0)
    held_out = task.make_split(50, seed=1, exclude={r["expression"] for r in train})
    assert not {r["expression"] for r in train} & {r["expression"] for r in held_out}
    assert all(task.label(r["expression"]) == r["answer"] for r in train + held_out)
    assert first_named("The exception `ValueError` is raised") == "ValueError"
    assert first_named("No exception.") == task.NO_ERROR and first_named("It returns 3") == ""
