"""Run under torchrun by test_hf_trainer.py: LoraTrainer under DDP (gloo), an uninterrupted run and
one resumed from its middle checkpoint; rank 0 writes both adapters for the test to compare."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import test_hf_trainer as t  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    kw = dict(max_steps=4, save_steps=2, per_device_train_batch_size=2, ddp_backend="gloo")
    full = t.LoraTrainer(model=t.lora_model(dropout=0.1), args=t.args(out / "full", **kw), train_dataset=t.TokenRows())
    full.train()
    model = t.lora_model(init_seed=7, dropout=0.1)
    resumed = t.LoraTrainer(model=model, args=t.args(out / "resumed", **kw), train_dataset=t.TokenRows())
    resumed.train(resume_from_checkpoint=str(out / "full" / "checkpoint-2"))
    if dist.get_rank() == 0:
        save_file(t.adapter_tensors(full.model), str(out / "full.safetensors"))
        save_file(t.adapter_tensors(model), str(out / "resumed.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
