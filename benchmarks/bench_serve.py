"""Serving throughput, in one run (in process, no HTTP):

1. mixed-adapter batch: 8 requests over 4 adapters decoded together (one forward per step with
   ``adapter_names``) vs the same 8 requests all on one adapter (target ≥ 0.9×);
2. the same 8 requests served one by one with adapter swapping (batch 1, one adapter in memory:
   each request unloads the previous adapter and loads its own from disk);
3. a merged model (adapter folded into the weights) vs the plain base model, both batch 8.

Every configuration runs the real :class:`lorakit.serve.engine.Engine` (prefill + KV-cached decode,
fixed output length via ignore_eos); figures are generated tokens per second, median of
``--repeats`` interleaved runs. The model is a small random Llama (or ``--base``) with random
rank-16 adapters on every linear layer.

    python benchmarks/bench_serve.py [--threads 1] [--tokens 64] [--repeats 5] [--json out.json]
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

SPECIAL = ["[UNK]", "<pad>", "<s>", "</s>"]
WORDS = ("the a of to and in is it that for on with as was by at from this be are or not have one two three "
         "red green blue cat dog bird fish tree sky sun moon day night good bad big small hot cold fast slow "
         "hello world lora adapter model merge serve batch token cache request answer question").split()


def build_demo_models(folder: Path, adapters: int = 4, rank: int = 16, hidden: int = 512, layers: int = 4,
                      vocab: int = 8192, seed: int = 0) -> dict[str, Path]:
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
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i in range(adapters):
        model = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                             target_modules=targets))
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
    from lorakit.serve.engine import Engine, ModelHost
    from lorakit.serve.registry import AdapterRegistry

    host = ModelHost(base_model)
    registry = AdapterRegistry(host, "base", max_loaded=max_loaded, root=dirs["root"])
    for i, name in enumerate(names):
        registry.add(name, dirs[name], load=i < max_loaded)
    engine = Engine(host, registry, tokenizer, max_batch=max_batch)
    engine.start()
    return engine


def _run(engine, jobs: list[tuple[list[int], str | None]], tokens: int) -> float:
    """Submit all jobs at once; generated tokens per second (wall clock, prefill included)."""
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
    start = time.perf_counter()
    for ids, adapter in jobs:
        engine.submit(GenerationRequest(ids, params, on_event, adapter=adapter))
    for _ in jobs:
        if not done.acquire(timeout=600):
            raise TimeoutError("benchmark run did not finish in 600 s")
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"generation failed: {errors[0]}")
    return len(jobs) * tokens / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="base model folder (default: build a small random Llama)")
    parser.add_argument("--adapters", nargs="*", help="4 adapter folders for --base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
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
        dirs = build_demo_models(Path(tmp.name))
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
    results: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.repeats):  # interleaved so machine-load drift hits every config alike
        for label, (eng, jobs) in configs.items():
            results[label].append(_run(eng, jobs, args.tokens))
    swap_jobs = [(p, names[i % 4]) for i, p in enumerate(prompts)]
    swap_tps = [_run_one_by_one(swapper, swap_jobs, args.tokens) for _ in range(max(1, args.repeats // 2))]
    results["one by one, adapter swapping"] = swap_tps
    loads = swapper.registry.loads
    for eng in (engine, swapper, merged, plain):
        eng.stop()

    med = {k: statistics.median(v) for k, v in results.items()}
    rows = [
        ("mixed 4 adapters / single adapter", med["mixed 4 adapters"] / med["single adapter"], "≥ 0.90"),
        ("mixed 4 adapters / one by one with swapping", med["mixed 4 adapters"] / med["one by one, adapter swapping"],
         "≫ 1"),
        ("merged model / base", med["merged model"] / med["base model"], "≈ 1.00"),
    ]
    print(f"batch {args.batch}, prompt {args.prompt_len} tokens, {args.tokens} generated tokens per request, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} repeats (median), model "
          f"{base.config.num_hidden_layers}L x {base.config.hidden_size}d, vocab {vocab}")
    for label, value in med.items():
        spread = f"{min(results[label]):.0f}-{max(results[label]):.0f}"
        print(f"  {label:32s} {value:8.1f} tok/s   (runs {spread})")
    print(f"  adapter loads from disk while swapping: {loads}")
    for label, ratio, target in rows:
        print(f"  {label:46s} {ratio:6.2f}x   (target {target})")
    if args.json:
        Path(args.json).write_text(json.dumps({"tok_per_s": med, "runs": results,
                                               "ratios": {r[0]: r[1] for r in rows}}, indent=2))
    return 0


def _run_one_by_one(engine, jobs, tokens: int) -> float:
    start = time.perf_counter()
    for job in jobs:  # each waits for the previous: batch 1, and the adapter swap in between
        _run(engine, [job], tokens)
    return len(jobs) * tokens / (time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
