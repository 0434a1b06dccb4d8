"""Mixed-adapter batch vs single-adapter batch (issue 16 item 2), lorakit and PEFT side by side.

4-layer Llama (hidden 512, intermediate 1536, vocab 8000), 4 adapters r=16 on all linear layers,
random non-zero factors, inference (no autograd). Two shapes: batch 8 x 128 tokens (prefill-like)
and batch 16 x 1 token (a decode step's layer shapes). Per shape, interleaved in one process
(A B C ... A B C ..., min process CPU time over the repeats after a warm-up):

* lorakit: every row on the active adapter (no routing: the single-adapter path); the same with
  ``adapter_names`` all on that adapter; rows over 4 adapters (gathered from the factor pools); the
  same mixed batch through the concatenate-and-mask path (the one before the pools);
* PEFT: every row on one adapter; its ``adapter_names`` mixed batch (a loop over sub-batches).

    OMP_NUM_THREADS=1 python benchmarks/bench_mixed.py --threads 1 --repeats 15
"""

from __future__ import annotations

import argparse
import copy
import json

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shapes", default="8x128,16x1", help="batch x tokens, comma-separated")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import peft

    from lorakit.bench import core
    from lorakit.core.layers.base import LoraLayer

    base = core.llama(hidden=512, layers=4, inter=1536).eval()
    ours = core.lorakit_model(copy.deepcopy(base), "all-linear", adapters=4).eval()
    cfg = dict(r=16, lora_alpha=32, target_modules="all-linear")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg), adapter_name="a0")
    for i in range(1, 4):
        pm.add_adapter(f"a{i}", peft.LoraConfig(**cfg))
    core._randomize(pm)
    pm.eval()

    def concat_path(ids, names):  # the mask path, forced: what mixed batches ran before the gather
        def step():
            original = LoraLayer._can_gather
            LoraLayer._can_gather = lambda *a, **k: False
            try:
                with torch.no_grad():
                    ours(input_ids=ids, adapter_names=names)
            finally:
                LoraLayer._can_gather = original
        return step

    results = {}
    for rows, seq in (tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")):
        ids = core.batch(8000, rows, seq)
        single, mixed = ["a0"] * rows, [f"a{i % 4}" for i in range(rows)]
        t = core.interleaved({
            "lorakit single": core.forward_step(ours, ids),
            "lorakit single, routed": core.forward_step(ours, ids, adapter_names=single),
            "lorakit mixed": core.forward_step(ours, ids, adapter_names=mixed),
            "lorakit mixed (concat+mask)": concat_path(ids, mixed),
            "PEFT single": core.forward_step(pm, ids),
            "PEFT mixed": core.forward_step(pm, ids, adapter_names=mixed),
        }, args.repeats, warmup=2)
        cpu = {k: min(v.cpu_times) for k, v in t.items()}
        shape = f"{rows}x{seq}"
        results[shape] = {
            "seconds": cpu,
            "lorakit mixed / lorakit single": cpu["lorakit mixed"] / cpu["lorakit single"],
            "lorakit routed single / lorakit single": cpu["lorakit single, routed"] / cpu["lorakit single"],
            "lorakit concat+mask / lorakit single": cpu["lorakit mixed (concat+mask)"] / cpu["lorakit single"],
            "PEFT mixed / PEFT single": cpu["PEFT mixed"] / cpu["PEFT single"],
            "lorakit mixed / PEFT mixed": cpu["lorakit mixed"] / cpu["PEFT mixed"],
        }
        print(f"batch {shape} ({args.threads} thread(s), min CPU time of {args.repeats}):")
        for k, v in cpu.items():
            print(f"  {k:30s} {v * 1e3:9.2f} ms")
        for k, v in results[shape].items():
            if k != "seconds":
                print(f"  {k:38s} {v:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
