"""Peak memory of `lorakit merge` vs model size: the streaming merge against the in-memory one.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_merge_memory.py [--sizes 512x8,1024x8,1024x16]
        [--shard 100MB] [--repeats 1] [--keep DIR]

For each size a random Llama checkpoint (fp32, vocab --vocab, untied head, saved in --shard shards) and a
rank-16 LoRA on q/k/v/o/gate/up/down are written; then each merge mode runs in its own process (modes
interleaved), writing --shard output shards. A process first merges a tiny model once (imports, lazy
initialisation), resets its peak RSS (``/proc/self/clear_refs``), runs the merge and reports VmHWM minus
the RSS before it, plus VmPeak (address space) minus VmSize before it. The streamed output is checked
to be byte-identical to the in-memory output.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorakit.bench.random_checkpoint import random_adapter, random_llama

CHILD = r"""
import json, os, sys, time
from pathlib import Path
from lorakit.export.merge import merge_to_checkpoint

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # MiB

base, adapter, out, mode, shard, warm_base, warm_adapter = sys.argv[1:8]
merge_to_checkpoint(warm_base, [warm_adapter], out + ".warm", streaming=mode == "streaming", max_shard_size=shard)
rss0, vm0 = status("VmRSS"), status("VmSize")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # resets VmHWM to the current RSS
start = time.perf_counter()
report = merge_to_checkpoint(base, [adapter], out, streaming=mode == "streaming", max_shard_size=shard)
seconds = time.perf_counter() - start
print(json.dumps({"peak_rss": status("VmHWM") - rss0, "peak_vm": status("VmPeak") - vm0, "rss_before": rss0,
                  "seconds": seconds, "streamed": report.streamed}))
"""


def _run(base: Path, adapter: Path, out: Path, mode: str, shard: str, warm: tuple[Path, Path]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(base), str(adapter), str(out), mode, shard,
                           str(warm[0]), str(warm[1])], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} merge failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512x8,1024x8,1024x16", help="hidden x layers, comma separated")
    parser.add_argument("--shard", default="100MB", help="shard size of the base and of the output")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", help="work folder (default: a temporary one, removed)")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="merge-mem-"))
    warm = (root / "warm-base", root / "warm-adapter")
    if not warm[0].exists():
        random_llama(warm[0], 64, 1, args.shard, vocab=256)
        random_adapter(warm[1], 64, 1, rank=4)
    rows = []
    for size in args.sizes.split(","):
        hidden, layers = (int(x) for x in size.split("x"))
        base, adapter = root / f"base-{size}", root / f"adapter-{size}"
        if not base.exists():
            random_llama(base, hidden, layers, args.shard, vocab=args.vocab)
            random_adapter(adapter, hidden, layers)
        model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        results: dict[str, list[dict]] = {"in_memory": [], "streaming": []}
        for r in range(args.repeats):
            for mode in ("in_memory", "streaming") if r % 2 == 0 else ("streaming", "in_memory"):
                out = root / f"out-{size}-{mode}"
                for leftover in (out, Path(str(out) + ".warm")):
                    if leftover.exists():
                        import shutil

                        shutil.rmtree(leftover)
                results[mode].append(_run(base, adapter, out, mode, args.shard, warm))
        same = all(filecmp.cmp(root / f"out-{size}-streaming" / p.name, p, shallow=False)
                   for p in (root / f"out-{size}-in_memory").iterdir() if p.name != "lorakit_merge.json")
        best = {m: min(results[m], key=lambda x: x["peak_rss"]) for m in results}
        rows.append((size, model_bytes / 2**20, best, same))
        print(f"{size}: model {model_bytes / 2**20:.0f} MiB, in-memory peak +{best['in_memory']['peak_rss']:.0f} MiB "
              f"({best['in_memory']['seconds']:.1f} s), streaming +{best['streaming']['peak_rss']:.0f} MiB "
              f"({best['streaming']['seconds']:.1f} s, streamed={best['streaming']['streamed']}), identical={same}",
              flush=True)
    print()
    print("| Llama (hidden x layers) | fp32 checkpoint (MiB) | in-memory: peak RSS over baseline (MiB) | streaming (MiB) "
          "| ratio streaming / in-memory | in-memory address space (MiB) | streaming address space (MiB) "
          "| in-memory (s) | streaming (s) | identical files |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, mib, best, same in rows:
        a, b = best["in_memory"], best["streaming"]
        print(f"| {size} | {mib:.0f} | {a['peak_rss']:.0f} | {b['peak_rss']:.0f} | {b['peak_rss'] / a['peak_rss']:.2f} "
              f"| {a['peak_vm']:.0f} | {b['peak_vm']:.0f} | {a['seconds']:.1f} | {b['seconds']:.1f} | {same} |")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"\n(total {time.time() - start:.0f} s)")
