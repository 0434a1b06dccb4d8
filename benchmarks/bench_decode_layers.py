"""Where an unmerged adapter's decode time goes: SmolLM2's 210 projections at one token, layer by layer.

The 30 layers × 7 projections of SmolLM2-135M (576 ↔ 576 / 192 / 1536), each a separate weight so that,
as in decoding, the weights come from memory rather than cache. One token (1 × 1 × in) goes through every
projection in turn, without autograd, in four ways interleaved in one process (min process CPU time):

* ``plain``: the nn.Linear layers alone (the base's share of a decode step);
* ``lora fast``: LoraLinear with one r=16 adapter, the no-grad path a decode step takes;
* ``lora general``: the same layers through the general forward (what decoding ran before the fast path);
* ``wrapper only``: the LoraLinear wrapper calling its base and nothing else (the Python the wrapper adds).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_decode_layers.py --repeats 15
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch
import torch.nn as nn

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)] * 30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=20, help="tokens (passes over the 210 layers) per sample")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lorakit.core.layers.linear import LoraLinear

    torch.manual_seed(0)
    plain = [nn.Linear(i, o, bias=False) for i, o in SHAPES]
    lora = []
    for layer in plain:
        wrapped = LoraLinear(nn.Linear(layer.in_features, layer.out_features, bias=False))
        wrapped.base.weight.data.copy_(layer.weight)
        wrapped.add_adapter("a", 16, 32, init=False)
        wrapped.active_adapters = ["a"]
        lora.append(wrapped.eval())
    xs = {d: torch.randn(1, 1, d) for d in (576, 1536)}

    def run(layers):
        for layer, (d_in, _) in zip(layers, SHAPES):
            layer(xs[d_in])

    def general():
        with mock.patch.object(LoraLinear, "_inference_adapter", lambda self: None):
            run(lora)

    def wrapper_only():
        with mock.patch.object(LoraLinear, "_inference_forward",
                               lambda self, x, adapter, a, k: self.base(x, *a, **k)):
            run(lora)

    cases = {"plain": lambda: run(plain), "lora fast": lambda: run(lora), "lora general": general,
             "wrapper only": wrapper_only}
    best = dict.fromkeys(cases, float("inf"))
    with torch.no_grad():
        for fn in cases.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in cases.items():
                start = time.process_time()
                for _ in range(args.tokens):
                    fn()
                best[name] = min(best[name], (time.process_time() - start) / args.tokens)
    base = best["plain"]
    print(f"210 SmolLM2 projections, 1 token, {args.threads} thread(s), min CPU time of {args.repeats}:")
    for name, seconds in best.items():
        extra = (seconds - base) / len(SHAPES) * 1e6
        print(f"  {name:14s} {seconds * 1e3:7.2f} ms  ratio {seconds / base:.3f}  per layer +{extra:5.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
