"""Adapter registration and residency time against the number already there (issue 14 item 1).

In process, the server's own objects (LoraModel + AdapterRegistry): a host that accumulates
adapters — up to ``--adapters`` registered, ``--max-adapters`` resident — and an empty reference
host. At 1, 10, 100 and ``--adapters`` registered, the same probes run on both, interleaved
(reference, loaded, reference, loaded, ...; min over ``--repeats``):

* register: read + validate one adapter folder (``registry.add(..., load=False)``) and forget it;
* install: make a registered adapter resident (slot + copies into the factor pools) and evict it.

A ratio near 1 means the cost does not grow with the count. Also prints the host memory the
registered adapters' factors take. Random Llama hidden 256, 2 layers, rank-8 all-linear adapters
(the folders ``benchmarks/bench_scale.py --workdir DIR`` builds; built here if missing).

    OMP_NUM_THREADS=1 python benchmarks/bench_adapter_count.py --workdir /tmp/scale
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--max-adapters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    folder = Path(args.workdir)
    if not (folder / "adapters" / f"ad{args.adapters - 1}").exists():
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        import bench_scale

        bench_scale.build(folder, args.adapters)
    from lorakit.core.model import LoraModel
    from lorakit.serve.engine import load_base_model
    from lorakit.serve.registry import AdapterRegistry

    def registry() -> AdapterRegistry:
        return AdapterRegistry(LoraModel(load_base_model(folder / "base")), "base", max_loaded=args.max_adapters)

    loaded, empty = registry(), registry()
    probe = folder / "adapters" / "ad0"
    empty.add("warm", probe, load=True)  # both hosts have their layers wrapped once

    def register(reg: AdapterRegistry) -> float:
        start = time.perf_counter()
        reg.add("probe", probe, load=False)
        seconds = time.perf_counter() - start
        reg.remove("probe", frozenset())
        return seconds

    def install(reg: AdapterRegistry) -> float:
        reg.add("probe", probe, load=False)
        start = time.perf_counter()
        reg.ensure_loaded("probe")
        seconds = time.perf_counter() - start
        reg.remove("probe", frozenset())
        return seconds

    rows, count = [], 0
    for checkpoint in (1, 10, 100, args.adapters):
        while count < checkpoint:
            loaded.add(f"ad{count}", folder / "adapters" / f"ad{count}", load=count < args.max_adapters)
            count += 1
        t = {"register": ([], []), "install": ([], [])}
        for _ in range(args.repeats):
            for name, fn in (("register", register), ("install", install)):
                t[name][0].append(fn(empty))
                t[name][1].append(fn(loaded))
        row = {"registered": count, "resident": len(loaded.loaded)}
        for name, (ref, got) in t.items():
            row[f"{name}_ms"] = round(1e3 * min(got), 3)
            row[f"{name}_ms_empty_host"] = round(1e3 * min(ref), 3)
            row[f"{name}_ratio"] = round(min(got) / min(ref), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    memory = {"host_copy_bytes": loaded.store.nbytes, "per_adapter_bytes": loaded.store.nbytes // count}
    print(json.dumps(memory))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, **memory}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
