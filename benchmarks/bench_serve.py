"""Serving throughput, in one run (in process, no HTTP):

1. mixed-adapter batch: 8 requests over 4 adapters decoded together (one forward per step with
   ``adapter_names``) vs the same 8 requests all on one adapter (target ≥ 0.9×);
2. the same 8 requests served one by one with adapter swapping (batch 1, one adapter in memory:
   each request unloads the previous adapter and loads its own from disk);
3. a merged model (adapter folded into the weights) vs the plain base model, both batch 8.

Every configuration runs the real :class:`lorakit.serve.engine.Engine` (prefill + KV-cached decode,
fixed output length via ignore_eos); figures are generated tokens per second, median of
``--repeats`` interleaved runs, by wall clock and by process CPU time (the latter barely moves
when other processes compete for the cores). The model is a random Llama (``--hidden``,
``--layers``; or ``--base``) with random rank-16 adapters on every linear layer (``--targets``).

    python benchmarks/bench_serve.py [--hidden 1024] [--threads 1] [--tokens 64] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECIAL = ["[UNK]", "<pad>", "<s>", "</s>"]
WORDS = ("the a of to and in is it that for on with as was by at from this be are or not have one two three "
         "red green blue cat dog bird fish tree sky sun moon day night good bad big small hot cold fast slow "
         "hello world lora adapter model merge serve batch token cache request answer question").split()


def build_demo_models(folder: Path, adapters: int = 4, rank: int = 16, hidden: int = 512, layers: int = 4,
                      vocab: int = 8192, seed: int = 0, targets: tuple[str, ...] = ALL_LINEAR) -> dict[str, Path]:
    """A random Llama (+ word-level tokenizer) and `adapters` random LoRA adapters, saved under folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import lorakit

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
                         vocab_size=vocab, max_position_embeddings=2048, eos_token_id=3, bos_token_id=2,
                         pad_token_id=1, initializer_range=0.05)
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(folder / "base")
    words = SPECIAL + WORDS + [f"w{i}" for i in range(vocab - len(SPECIAL) - len(WORDS))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    fast.save_pretrained(folder / "base")
    out = {"base": folder / "base", "root": folder / "adapters"}
    for i in range(adapters):
        model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                             target_modules=list(targets)))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        name = f"ad{i}"
        model.save_pretrained(folder / "adapters" / name)
        out[name] = folder / "adapters" / name
    return out


def _engine(base_model, dirs: dict[str, Path], names: list[str], max_loaded: int, max_batch: int, tokenizer):
    from lorakit.core.model import LoraModel
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import AdapterRegistry

    served = LoraModel(base_model)  # no adapters yet: the registry loads them
    registry = AdapterRegistry(served, "base", max_loaded=max_loaded, root=dirs["root"])
    for i, name in enumerate(names):
        registry.add(name, dirs[name], load=i < max_loaded)
    engine = Engine(served, registry, tokenizer, max_batch=max_batch)
    engine.start()
    return engine


def _run(engine, jobs: list[tuple[list[int], str | None]], tokens: int) -> tuple[float, float]:
    """Submit all jobs at once; generated tokens per second of (wall clock, process CPU time),
    prefill included. CPU time barely moves when other processes compete for the cores."""
    from lorakit.serve.engine import GenerationRequest
    from lorakit.serve.generation import SamplingParams

    done = threading.Semaphore(0)
    errors = []

    def on_event(ev):
        if ev.error is not None:
            errors.append(ev.error)
        if ev.final:
            done.release()

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    for ids, adapter in jobs:
        engine.submit(GenerationRequest(ids, params, on_event, adapter=adapter))
    for _ in jobs:
        if not done.acquire(timeout=600):
            raise TimeoutError("benchmark run did not finish in 600 s")
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if errors:
        raise RuntimeError(f"generation failed: {errors[0]}")
    return len(jobs) * tokens / elapsed, len(jobs) * tokens / cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model folder (default: build a small random Llama)")
    parser.add_argument("--adapters", nargs="*", help="4 adapter folders for --base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    parser.add_argument("--hidden", type=int, default=1024, help="built model: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="built model: decoder layers")
    parser.add_argument("--rank", type=int, default=16, help="built adapters: rank")
    parser.add_argument("--targets", default=",".join(ALL_LINEAR), help="built adapters: target modules")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from lorakit.serve.engine import load_base_model

    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    if args.base:
        dirs = {"base": Path(args.base), "root": Path(args.adapters[0]).parent}
        dirs.update({f"ad{i}": Path(p) for i, p in enumerate(args.adapters or [])})
    else:
        dirs = build_demo_models(Path(tmp.name), rank=args.rank, hidden=args.hidden, layers=args.layers,
                                 targets=tuple(args.targets.split(",")))
    names = sorted(k for k in dirs if k.startswith("ad"))[:4]
    if len(names) != 4:
        parser.error("give exactly 4 --adapters")
    tokenizer = AutoTokenizer.from_pretrained(dirs["base"])
    base = load_base_model(dirs["base"])
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]

    import lorakit

    # each engine gets its own copy: loading adapters wraps the model's layers in place
    swap_model, merged_model, plain_model = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    engine = _engine(base, dirs, names, max_loaded=4, max_batch=args.batch, tokenizer=tokenizer)
    swapper = _engine(swap_model, dirs, names, max_loaded=1, max_batch=1, tokenizer=tokenizer)

    merged_model = lorakit.LoraModel.from_pretrained(merged_model, dirs[names[0]], "m").merge_and_unload()
    merged = _engine(merged_model, dirs, [], max_loaded=1, max_batch=args.batch, tokenizer=tokenizer)
    plain = _engine(plain_model, dirs, [], max_loaded=1, max_batch=args.batch, tokenizer=tokenizer)

    configs = {
        "mixed 4 adapters": (engine, [(p, names[i % 4]) for i, p in enumerate(prompts)]),
        "single adapter": (engine, [(p, names[0]) for p in prompts]),
        "base model": (plain, [(p, None) for p in prompts]),
        "merged model": (merged, [(p, None) for p in prompts]),
    }
    _run(engine, configs["mixed 4 adapters"][1][:2], 4)  # warm up
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
    for _ in range(args.repeats):  # interleaved so machine-load drift hits every config alike
        for label, (eng, jobs) in configs.items():
            results[label].append(_run(eng, jobs, args.tokens))
    swap_jobs = [(p, names[i % 4]) for i, p in enumerate(prompts)]
    results["one by one, adapter swapping"] = [_run_one_by_one(swapper, swap_jobs, args.tokens)
                                               for _ in range(max(1, args.repeats // 2))]
    loads = swapper.registry.loads
    for eng in (engine, swapper, merged, plain):
        eng.stop()

    wall = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in results.items()}
    pairs = [("mixed 4 adapters / single adapter", "mixed 4 adapters", "single adapter", "≥ 0.90"),
             ("mixed 4 adapters / one by one with swapping", "mixed 4 adapters", "one by one, adapter swapping",
              "≫ 1"),
             ("merged model / base", "merged model", "base model", "≈ 1.00")]
    ratios = {label: (wall[a] / wall[b], cpu[a] / cpu[b]) for label, a, b, _ in pairs}
    print(f"batch {args.batch}, prompt {args.prompt_len} tokens, {args.tokens} generated tokens per request, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} interleaved repeats (median), model "
          f"{base.config.num_hidden_layers}L x {base.config.hidden_size}d, vocab {vocab}, 4 adapters r={args.rank} on "
          f"{args.targets if not args.base else 'their targets'}")
    print(f"  {'':32s} {'wall tok/s':>11s} {'CPU tok/s':>11s}   wall runs")
    for label in results:
        spread = f"{min(w for w, _ in results[label]):.0f}-{max(w for w, _ in results[label]):.0f}"
        print(f"  {label:32s} {wall[label]:11.1f} {cpu[label]:11.1f}   {spread}")
    print(f"  adapter loads from disk while swapping: {loads}")
    for label, _, _, target in pairs:
        w, c = ratios[label]
        print(f"  {label:46s} wall {w:5.2f}x  CPU {c:5.2f}x   (target {target})")
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_tok_per_s": wall, "cpu_tok_per_s": cpu, "runs": results,
                                               "ratios_wall_cpu": ratios}, indent=2))
    return 0


def _run_one_by_one(engine, jobs, tokens: int) -> tuple[float, float]:
    start, cpu_start = time.perf_counter(), time.process_time()
    for job in jobs:  # each waits for the previous: batch 1, and the adapter swap in between
        _run(engine, [job], tokens)
    n = len(jobs) * tokens
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu_start)


if __name__ == "__main__":
    sys.exit(main())
