"""Where bitsandbytes' CPU ``dequantize_4bit`` disagrees with its own quantiser, on this CPU.

    .venv/bin/python benchmarks/bnb_cpu_dequant_check.py

For each shape / blocksize / dtype / double-quant setting it quantises a random weight with
``bitsandbytes.functional.quantize_4bit`` and compares bnb's ``dequantize_4bit`` with the closed form
of bnb's own packed bytes and scales (``code[nibble] · absmax``, nested absmax rebuilt from its
state2: tests/quant/quant_helpers.py). Prints the CPU capability torch reports, then one row per
disagreeing setting with bnb's and lorakit's relative RMS error against the original weight.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "quant"))
from quant_helpers import closed_form_dequant  # noqa: E402

from lorakit.quant import dequantize_4bit, quantize_4bit  # noqa: E402

SHAPES = [(7, 13), (64, 64), (48, 80), (300, 70), (97, 129), (128, 128), (32, 64), (64, 128), (1024, 64),
          (256, 256), (4096,), (5, 3, 41)]


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt())


def main() -> int:
    import bitsandbytes
    import bitsandbytes.functional as bnbf

    torch.set_num_threads(1)
    torch._dynamo.config.disable = True  # bnb's fallback path is torch.compile'd: seconds per shape
    print(f"bitsandbytes {bitsandbytes.__version__}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| shape | blocksize | dtype | double quant | bnb rel. RMS | lorakit rel. RMS |")
    print("|---|---:|---|---|---:|---:|")
    tried = bad = 0
    for shape in SHAPES:
        for blocksize in (32, 64, 128, 256):
            for dtype in (torch.float32, torch.bfloat16):
                for nested in (True, False):
                    tried += 1
                    gen = torch.Generator().manual_seed(tried)
                    weight = (torch.randn(shape, generator=gen) * 0.3).to(dtype)
                    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4",
                                                       compress_statistics=nested)
                    theirs = bnbf.dequantize_4bit(packed, state, quant_type="nf4").reshape(shape)
                    if torch.equal(theirs, closed_form_dequant(packed, state)):
                        continue
                    bad += 1
                    ours = dequantize_4bit(*quantize_4bit(weight, blocksize, nested, "nf4"))
                    print(f"| {tuple(shape)} | {blocksize} | {str(dtype).removeprefix('torch.')} | {nested} "
                          f"| {rel_rms(theirs, weight):.3f} | {rel_rms(ours, weight):.3f} |")
    print(f"\n{bad} of {tried} settings disagree with the closed form of bnb's own state")
    return 0


if __name__ == "__main__":
    sys.exit(main())
