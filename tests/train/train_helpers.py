"""The tiny training config the process-level train tests share (tiny-llama 32 wide, examples' instructions)."""

from __future__ import annotations

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def tiny_raw_config(out: Path, log_every: int = 5, **train) -> dict:
    """A raw lorakit train config: all-linear r=4 with dropout on (the RNG state must survive interruptions)."""
    return {
        "model": {"name_or_path": "tiny-llama", "overrides": {"hidden_size": 32, "intermediate_size": 64}},
        "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear"},
        "data": {"train_file": str(EXAMPLES / "instructions.jsonl"), "max_length": 96},
        "train": {"output_dir": str(out), "batch_size": 2, "lr": 3e-3, "threads": 1, "log_every": log_every,
                  **train},
    }
