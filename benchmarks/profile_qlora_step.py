"""Where a lorakit QLoRA train step spends its time (torch.profiler, 1 thread), on bench_quant's model.

    PYTHONPATH=src .venv/bin/python benchmarks/profile_qlora_step.py

Same model and batch as ``bench_quant.py --only train`` (SmolLM2 layer shapes, 4 layers, vocab
8000, batch 4×128, LoRA r=16 on the 7 projections, fp32): 2 warm-up steps, then 2 profiled steps;
prints the ops by self CPU time.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant import SMOLLM2, save_random_llama  # noqa: E402


def main() -> None:
    import lorakit
    from lorakit.quant import load_4bit

    torch.set_num_threads(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with tempfile.TemporaryDirectory() as tmp:
        save_random_llama(Path(tmp), SMOLLM2["hidden"], 4, SMOLLM2["inter"], 8000, SMOLLM2["kv_heads"])
        base = load_4bit(tmp, compute_dtype=torch.float32)
    model = lorakit.get_lora_model(base, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    model.train()
    ids = torch.randint(0, 8000, (4, 128), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    with profile() as prof:
        for _ in range(2):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
