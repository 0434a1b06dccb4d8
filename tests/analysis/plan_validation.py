"""Planner vs measured peak on a few configurations; prints the table kept in BENCHMARKS.md.

    python tests/analysis/plan_validation.py            (about 10 minutes on 2 busy cores)
"""

from __future__ import annotations

import sys
import tempfile

from plan_models import llama_256_folder

from lorakit.analysis.measure import measure_training_peak
from lorakit.analysis.plan import PlanRequest, plan_memory


def main() -> int:
    from transformers import LlamaConfig

    folder = tempfile.mkdtemp(prefix="llama512-")
    # the REFERENCES.md baseline model: Llama hidden 512, inter 1536, 8 layers, vocab 8000
    LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=8000, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    llama_256 = llama_256_folder()  # plan's old "tiny-llama" (tests/analysis/plan_models.py)
    configs = {
        "llama-256x4 all-linear r16, 4x128": PlanRequest(llama_256, r=16, batch=4, seq=128),
        "minilm query,value r8, 16x128": PlanRequest("minilm", r=8, target=["query", "value"], batch=16, seq=128),
        "llama-256x4 all-linear r16, 4x128, checkpointing": PlanRequest(llama_256, r=16, batch=4, seq=128,
                                                                        grad_checkpointing=True),
        "llama-512x8 all-linear r16, 4x256": PlanRequest(folder, r=16, batch=4, seq=256),
        "llama-256x4 q,v r8 bf16, 4x256": PlanRequest(llama_256, r=8, target=["q_proj", "v_proj"], batch=4,
                                                      seq=256, dtype="bfloat16"),
    }
    print("| configuration | planned MiB | measured MiB | error | measured, default glibc MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, request in configs.items():
        planned = plan_memory(request).total_bytes / 2**20
        measured = measure_training_peak(request, steps=2).peak_bytes / 2**20
        default = measure_training_peak(request, steps=2, fixed_mmap_threshold=False).peak_bytes / 2**20
        print(f"| {name} | {planned:.0f} | {measured:.0f} | {100 * (planned - measured) / measured:+.1f}% "
              f"| {default:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
