"""`lorakit bench --model NAME`: the side-by-side figures on a real pretrained checkpoint (e.g. SmolLM2-135M).

Same rules as the random-Llama sections (:mod:`lorakit.bench.suite`): every ratio comes from two timings
interleaved in one process (A B A B …, min over the repeats after a warm-up), peak RSS from fresh
subprocesses. Timings are process CPU time (run with one torch thread): on a shared machine wall-clock
ratios of these multi-second calls swung ±20% between runs, CPU time far less; the wall-clock ratio of the
same calls is printed beside each. Sections:

* ``train``: one LoRA step (all-linear r=16, AdamW) of lorakit vs PEFT vs the floor (the same forward +
  backward with every weight frozen), batch ``BATCH`` × ``SEQ`` random tokens;
* ``memory``: peak RSS of a process training that step (floor / lorakit / PEFT);
* ``qlora``: the step on an NF4 (double quant) base, lorakit vs PEFT + bitsandbytes, with the floor (the dense
  frozen model's forward + activation backward) against PEFT + bitsandbytes beside it;
* ``decode``: greedy decoding tokens/s (issue 16's decode table): ``generate`` on the merged model and on
  lorakit's unmerged single adapter (and PEFT's) against ``generate`` on the base, batch 1; lorakit's serving
  engine on the merged model against a plain ``generate`` on the same merged model, batch 1 and 16; the
  engine with one unmerged adapter against the engine on the base;
* ``serve``: engine throughput, batch 8 over 4 adapters vs all 8 rows on one adapter vs the base.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from lorakit.bench import core
from lorakit.bench.suite import Row, _bnb_quantize, one_thread

BATCH, SEQ = 1, 256  # training batch: SEQ is the issue's; batch 1 keeps an fp32 step at a few seconds on 1 core
NEW_TOKENS = 32  # generated per decode request (EOS ignored, so every run produces exactly this many)
PROMPT = "What is the capital of France?"


def _row(figure: str, t: dict, ours: str, ref: str, ref_name: str, target: str = "") -> Row:
    """ours vs ref by min process CPU time (one torch thread: the work itself, little moved by other
    processes), with the wall-clock ratio of the same calls alongside."""
    return Row(figure, t[ours].cpu_min, t[ref].cpu_min, ref_name, target,
               wall_ratio=t[ours].min / t[ref].min)


def model_dir(name: str) -> Path:
    """A checkpoint folder for a preset name, a folder or a hub id (lorakit.models.resolve_base)."""
    from lorakit.models import resolve_base

    return Path(resolve_base(name))


def load(path: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _label(path: Path) -> str:
    cfg = json.loads((path / "config.json").read_text())
    return f"{path.name.split('-q4')[0]} ({cfg['num_hidden_layers']}L×{cfg['hidden_size']}d)"


def train_steps(path: Path, repeats: int) -> list[Row]:
    """all-linear r=16: lorakit vs PEFT vs the floor, interleaved."""
    base = load(path)
    ids = core.batch(base.config.vocab_size, BATCH, SEQ)
    fns = {
        "floor": core.floor_step(copy.deepcopy(base), ids),
        "lorakit": core.train_step(core.lorakit_model(copy.deepcopy(base), "all-linear"), ids),
        "peft": core.train_step(core.peft_model(copy.deepcopy(base), "all-linear"), ids),
    }
    del base
    t = core.interleaved(fns, repeats)
    name = f"{_label(path)} train all-linear r=16, {BATCH}×{SEQ}"
    return [
        _row(f"{name} vs floor", t, "lorakit", "floor", "floor", "<= 1.08"),
        _row(f"{name} vs PEFT", t, "lorakit", "peft", "PEFT", "<= 0.90"),
        _row(f"{name}: PEFT vs floor (reference)", t, "peft", "floor", "floor"),
    ]


_MEMORY_SCRIPT = r"""
import json, sys, torch
sys.path[:0] = {paths!r}
from lorakit.bench import core, real
torch.manual_seed(0)
torch.set_num_threads({threads})
base = real.load(real.Path({path!r}))
ids = core.batch(base.config.vocab_size, real.BATCH, real.SEQ)
kind = {kind!r}
if kind == "floor":
    step = core.floor_step(base, ids)
elif kind == "lorakit":
    step = core.train_step(core.lorakit_model(base, "all-linear"), ids)
else:
    step = core.train_step(core.peft_model(base, "all-linear"), ids)
import gc; gc.collect()
before = core.vm_kb("VmRSS")
core.reset_peak()
for _ in range(2):
    step()
print(json.dumps({{"peak_mb": core.vm_kb("VmHWM") / 1024, "before_mb": before / 1024}}))
"""


def peak_memory(path: Path, threads: int) -> list[Row]:
    """Peak RSS while training two steps (floor / lorakit / PEFT), each in a fresh process.

    The peak is VmHWM, reset after the model (and LoRA / optimizer) is built, so it is the training
    step's peak including the resident weights, not the loader's.
    """
    peaks = {}
    for kind in ("floor", "lorakit", "peft"):
        script = _MEMORY_SCRIPT.format(paths=sys.path, threads=threads, path=str(path), kind=kind)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        peaks[kind] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    name = f"{_label(path)} peak RSS in training, all-linear r=16, {BATCH}×{SEQ}"
    return [
        Row(f"{name} vs floor", peaks["lorakit"], peaks["floor"], "floor", "<= 1.15", "MB"),
        Row(f"{name} vs PEFT", peaks["lorakit"], peaks["peft"], "PEFT", "<= 1.0", "MB"),
        Row(f"{name}: PEFT vs floor (reference)", peaks["peft"], peaks["floor"], "floor", "", "MB"),
    ]


@one_thread
def qlora_step(path: Path, repeats: int) -> list[Row]:
    """NF4 (double quant) base + all-linear r=16: lorakit vs PEFT + bitsandbytes, interleaved."""
    import bitsandbytes as bnb

    from lorakit.quant import quantize_model

    base = load(path)
    ids = core.batch(base.config.vocab_size, BATCH, SEQ)
    ours = quantize_model(copy.deepcopy(base), "nf4", double_quant=True, skip=["lm_head"])
    ours = core.lorakit_model(ours, "all-linear")
    theirs = copy.deepcopy(base)
    _bnb_quantize(theirs, bnb)
    theirs = core.peft_model(theirs, "all-linear")
    t = core.interleaved({"ours": core.train_step(ours, ids), "theirs": core.train_step(theirs, ids),
                          "floor": core.floor_step(base, ids)}, repeats)
    name = f"{_label(path)} QLoRA step (NF4+DQ) all-linear r=16, {BATCH}×{SEQ}"
    return [_row(f"{name} vs PEFT + bitsandbytes", t, "ours", "theirs", "PEFT+bnb", "<= 0.8"),
            _row(f"{name}: the floor (dense, frozen) vs PEFT + bnb (reference)", t, "floor", "theirs", "PEFT+bnb")]


# ------------------------------------------------------------------------------------------ decoding
def _adapters(base, folder: Path, count: int = 4) -> dict[str, Path]:
    """`count` random all-linear r=16 adapters saved in PEFT format (non-zero B, as after training)."""
    from lorakit.core.config import LoraConfig
    from lorakit.core.model import get_lora_model

    out = {}
    for i in range(count):
        model = get_lora_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        out[f"ad{i}"] = folder / f"ad{i}"
        model.save_pretrained(out[f"ad{i}"])
    return out


def _engine(model, adapters: dict[str, Path], tokenizer, max_batch: int):
    from lorakit.core.model import LoraModel
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import AdapterRegistry

    served = LoraModel(model)  # no adapters yet: the registry loads them
    registry = AdapterRegistry(served, "base", max_loaded=max(1, len(adapters)))
    for name, folder in adapters.items():
        registry.add(name, folder, load=True)
    engine = Engine(served, registry, tokenizer, max_batch=max_batch)
    engine.start()
    return engine


def _engine_job(engine, prompt: list[int], adapters: list[str | None], tokens: int):
    """A callable that submits one request per entry of `adapters` at once and waits for all."""
    from lorakit.serve.engine import GenerationRequest
    from lorakit.serve.generation import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    def run():
        done, errors = threading.Semaphore(0), []

        def on_event(ev):
            if ev.error is not None:
                errors.append(ev.error)
            if ev.final:
                done.release()

        for adapter in adapters:
            engine.submit(GenerationRequest(list(prompt), params, on_event, adapter=adapter))
        for _ in adapters:
            if not done.acquire(timeout=600):
                raise TimeoutError("a benchmark generation did not finish in 600 s")
        if errors:
            raise RuntimeError(f"generation failed: {errors[0]}")

    return run


def _hf_job(model, prompt: list[int], rows: int, tokens: int, pad_id: int):
    ids = torch.tensor([prompt] * rows)

    def run():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, pad_token_id=pad_id)

    return run


def _prompt(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": PROMPT}]
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return tokenizer(PROMPT)["input_ids"]


@one_thread
def decode_and_serve(path: Path, repeats: int, sections: tuple[str, ...] = ("decode", "serve")) -> list[Row]:
    """Greedy tokens/s (batch 1 and 16) and engine throughput (batch 8, 4 adapters), interleaved."""
    import peft
    from transformers import AutoTokenizer

    from lorakit.core.model import LoraModel

    base = load(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = _prompt(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = NEW_TOKENS
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        adapters = _adapters(base, Path(tmp))
        names = list(adapters)
        merged = LoraModel.from_pretrained(copy.deepcopy(base), adapters["ad0"]).merge_and_unload()
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapters["ad0"]).eval()
        eng_merged = _engine(merged, {}, tokenizer, max_batch=8)
        eng_lora = _engine(copy.deepcopy(base), adapters, tokenizer, max_batch=8)
        eng_base = _engine(copy.deepcopy(base), {}, tokenizer, max_batch=8)
        engines = [eng_merged, eng_lora, eng_base]
        jobs = {}
        if "decode" in sections:
            from lorakit.core.model import LoraModel as _LoraModel  # not the package root (import-order rule)

            lora_model = _LoraModel.from_pretrained(copy.deepcopy(base), adapters["ad0"]).eval()
            eng_merged16 = _engine(merged, {}, tokenizer, max_batch=16)
            engines.append(eng_merged16)
            jobs.update({
                "hf base b1": _hf_job(base, prompt, 1, n, pad),
                "hf merged b1": _hf_job(merged, prompt, 1, n, pad),
                "lorakit unmerged b1": _hf_job(lora_model, prompt, 1, n, pad),
                "peft unmerged b1": _hf_job(peft_model, prompt, 1, n, pad),
                "engine merged b1": _engine_job(eng_merged, prompt, [None], n),
                "engine unmerged b1": _engine_job(eng_lora, prompt, ["ad0"], n),
                "engine base b1": _engine_job(eng_base, prompt, [None], n),
                "hf merged b16": _hf_job(merged, prompt, 16, n, pad),
                "engine merged b16": _engine_job(eng_merged16, prompt, [None] * 16, n),
            })
        if "serve" in sections:
            jobs.update({
                "serve mixed b8": _engine_job(eng_lora, prompt, [names[i % 4] for i in range(8)], n),
                "serve single b8": _engine_job(eng_lora, prompt, ["ad0"] * 8, n),
                "serve base b8": _engine_job(eng_base, prompt, [None] * 8, n),
            })
        rows_of = {name: int(name.rsplit("b", 1)[1]) for name in jobs}
        try:
            t = core.interleaved(jobs, repeats)
        finally:
            for engine in engines:
                engine.stop()
    # generated tokens per second of CPU time (one thread), and by wall clock
    tokens = {name: rows_of[name] * n / t[name].cpu_min for name in jobs}
    wall = {name: rows_of[name] * n / t[name].min for name in jobs}

    def tok_row(figure: str, ours: str, ref: str, ref_name: str, target: str = "") -> Row:
        return Row(figure, tokens[ours], tokens[ref], ref_name, target, "tok/s", wall[ours] / wall[ref])

    label = _label(path)
    out = []
    if "decode" in sections:
        ref = "generate on base"
        out += [
            tok_row(f"{label} greedy b1, generate: merged vs base (same ops: noise only)",
                    "hf merged b1", "hf base b1", ref, ">= 0.95"),
            tok_row(f"{label} greedy b1, generate: lorakit unmerged r=16 vs base (time <= 1.05x)",
                    "lorakit unmerged b1", "hf base b1", ref, ">= 0.952"),
            tok_row(f"{label} greedy b1, generate: PEFT unmerged r=16 vs base (reference)",
                    "peft unmerged b1", "hf base b1", ref),
            tok_row(f"{label} greedy b1: engine vs generate, both on the merged model",
                    "engine merged b1", "hf merged b1", "generate on merged", ">= 0.90"),
            tok_row(f"{label} greedy b16: engine vs generate, both on the merged model",
                    "engine merged b16", "hf merged b16", "generate on merged b16", ">= 0.90"),
            tok_row(f"{label} greedy b1, engine: 1 unmerged adapter vs the base (reference)",
                    "engine unmerged b1", "engine base b1", "engine on base"),
        ]
    if "serve" in sections:
        out += [
            tok_row(f"{label} serving b8: 4 mixed adapters vs all rows on 1 adapter",
                    "serve mixed b8", "serve single b8", "1 adapter", ">= 0.90"),
            tok_row(f"{label} serving b8: 4 mixed adapters vs base (no adapters)",
                    "serve mixed b8", "serve base b8", "base"),
        ]
    return out
