"""The GPU checks of issue 16, as one script for the day a CUDA GPU is available (not yet run).

    .venv/bin/python benchmarks/bench_gpu.py                 # SmolLM2-135M shapes, random weights
    .venv/bin/python benchmarks/bench_gpu.py --layers 30 --vocab 49152   # the full model's size

Needs a CUDA build of torch (README, "On a fresh machine"), triton, and for the reference
bitsandbytes with CUDA kernels. Measures, side by side in one process, alternating A B A B:

1. QLoRA train step (NF4 + double quant, bf16 compute, LoRA r=16 on the 7 projections) —
   lorakit (Triton kernels: NF4 decoded inside the matmuls, fused LoRA add) vs PEFT + bitsandbytes:
   step time and peak GPU memory (``torch.cuda.max_memory_allocated`` over the step).
   Goal from issue 16: ≥ 2× faster, ≤ 0.4× the memory.
2. Mixed-adapter serving forward: 4 adapters, one per row, batch 16 × 1 token (decode) and
   8 × 128 (prefill), lorakit's SGMV path vs the same model with LORAKIT_TRITON=0 (masked
   concatenation): tokens/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant import SMOLLM2, save_random_llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cuda_timed(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def build(lib: str, path: Path):
    if lib == "lorakit":
        import lorakit
        from lorakit.quant import load_4bit

        base = load_4bit(path, compute_dtype=torch.bfloat16).cuda()
        return lorakit.get_lora_model(base, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cuda")
    return peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))


def train_step_figures(path: Path, batch: int, seq: int, repeats: int, rounds: int) -> list[str]:
    times: dict[str, list[float]] = {"lorakit": [], "peft": []}
    peaks: dict[str, float] = {}
    for _ in range(rounds):
        for lib in times:
            model = build(lib, path)
            model.train()
            ids = torch.randint(0, model.config.vocab_size if hasattr(model, "config") else 8000,
                                (batch, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def step(model=model, ids=ids, opt=opt):
                loss = model(input_ids=ids, labels=ids).loss
                opt.zero_grad()
                loss.backward()
                opt.step()

            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times[lib] += cuda_timed(step, repeats)
            peaks[lib] = max(peaks.get(lib, 0.0), torch.cuda.max_memory_allocated() / 2**20)
            del model, opt
            torch.cuda.empty_cache()
    t = {k: (min(v), statistics.median(v)) for k, v in times.items()}
    return [
        f"| QLoRA step, batch {batch}×{seq}, bf16 | min (s) | median (s) | peak GPU memory (MiB) |",
        "|---|---|---|---|",
        *(f"| {k} | {t[k][0]:.4f} | {t[k][1]:.4f} | {peaks[k]:.0f} |" for k in ("lorakit", "peft")),
        f"| PEFT+bnb / lorakit (time; goal ≥ 2) | {t['peft'][0] / t['lorakit'][0]:.2f}× | "
        f"{t['peft'][1] / t['lorakit'][1]:.2f}× | lorakit / PEFT+bnb (goal ≤ 0.4): "
        f"{peaks['lorakit'] / peaks['peft']:.2f} |",
    ]


def serving_figures(path: Path, repeats: int, rounds: int) -> list[str]:
    from transformers import AutoModelForCausalLM

    import lorakit

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    model = lorakit.get_lora_model(base, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), "a0")
    for i in range(1, 4):
        model.add_adapter(f"a{i}", lorakit.LoraConfig(r=8 * i, lora_alpha=16, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.01)
    model.eval()
    lines = ["| mixed 4-adapter forward | SGMV tokens/s | masked-concat tokens/s | ratio |", "|---|---|---|---|"]
    for batch, seq in ((16, 1), (8, 128)):
        ids = torch.randint(0, 8000, (batch, seq), device="cuda")
        names = [f"a{i % 4}" for i in range(batch)]
        res: dict[str, list[float]] = {"1": [], "0": []}
        for _ in range(rounds):
            for mode in res:
                os.environ["LORAKIT_TRITON"] = mode
                with torch.no_grad():
                    res[mode] += cuda_timed(lambda ids=ids, names=names: model(ids, adapter_names=names), repeats)
        os.environ.pop("LORAKIT_TRITON", None)
        tps = {k: batch * seq / min(v) for k, v in res.items()}
        lines.append(f"| batch {batch}×{seq} | {tps['1']:.0f} | {tps['0']:.0f} | {tps['1'] / tps['0']:.2f}× |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU and a CUDA build of torch (README, 'On a fresh machine')")
    print(f"# bench_gpu  torch {torch.__version__}  {torch.cuda.get_device_name()}")
    print(f"# {' '.join([os.path.relpath(sys.executable), *sys.argv])}\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "smollm2_shapes"
        save_random_llama(path, SMOLLM2["hidden"], args.layers, SMOLLM2["inter"], args.vocab, SMOLLM2["kv_heads"])
        print("\n".join(train_step_figures(path, args.batch, args.seq, args.repeats, args.rounds)), "\n", flush=True)
        print("\n".join(serving_figures(path, args.repeats, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
