"""Where a QLoRA train step spends its time, lorakit vs PEFT + bitsandbytes (torch.profiler, 1 thread).

    PYTHONPATH=src .venv/bin/python benchmarks/profile_qlora_step.py [--compute bf16]

Same model and batch as ``bench_quant.py --only train`` (SmolLM2 layer shapes, 4 layers, vocab
8000, batch 4×128, LoRA r=16 on the 7 projections, fp32): both models are built in this process,
2 warm-up steps each, then 2 profiled steps of each; prints the ops by self CPU time per library and
a summary (matmul time, dequantisation time, everything else) side by side. ``--compute bf16``: the
QLoRA paper's recipe as ``lorakit bench --only qlora`` runs it — every full-precision tensor in bf16,
the 4-bit matmuls in bf16, the LoRA factors fp32 (both libraries' default on a bf16 base).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant import SMOLLM2, save_random_llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(lib: str, path: str, dtype: torch.dtype):
    torch.manual_seed(0)
    if lib == "lorakit":
        import lorakit
        from lorakit.quant import load_4bit

        base = load_4bit(path, compute_dtype=dtype, dtype=dtype)
        model = lorakit.get_lora_model(base, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    else:
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
        base = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu", dtype=dtype)
        model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    model.train()
    ids = torch.randint(0, 8000, (4, 128), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compute", choices=["fp32", "bf16"], default="fp32", help="compute dtype (default fp32)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[parser.parse_args().compute]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        save_random_llama(Path(tmp), SMOLLM2["hidden"], 4, SMOLLM2["inter"], 8000, SMOLLM2["kv_heads"])
        steps = {lib: build(lib, tmp, dtype) for lib in ("lorakit", "peft+bnb")}
    summary = {}
    for lib, step in steps.items():
        for _ in range(2):
            step()
        with profile() as prof:
            for _ in range(2):
                step()
        events = prof.key_averages()
        print(f"===== {lib}")
        print(events.table(sort_by="self_cpu_time_total", row_limit=15))
        total = sum(e.self_cpu_time_total for e in events) / 2e3  # ms per step
        mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::addmm_",
                                                                      "aten::bmm")) / 2e3
        deq = sum(e.self_cpu_time_total for e in events if "dequant" in e.key.lower()) / 2e3
        # bnb's nested-scale decoding is its own op (dequantize_blockwise), counted as dequantisation too
        summary[lib] = (total, mm, deq)
    print("| per step (profiled, ms of self CPU time) | total | matmuls (mm/addmm) | dequantisation | the rest |")
    print("|---|---:|---:|---:|---:|")
    for lib, (total, mm, deq) in summary.items():
        print(f"| {lib} | {total:.0f} | {mm:.0f} ({mm / total:.0%}) | {deq:.0f} ({deq / total:.1%}) | "
              f"{total - mm - deq:.0f} ({(total - mm - deq) / total:.0%}) |")


if __name__ == "__main__":
    main()
