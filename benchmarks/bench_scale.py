"""Thousands of adapters (issue 14 item 1): a real `lorakit serve` process, 1,000 registered / 100 resident.

Builds a random Llama (hidden 256, 2 layers, vocab 4096) and ``--adapters`` random rank-8 adapters on
every linear layer (distinct folders, non-zero factors), then starts ``python -m lorakit serve`` on a
free loopback port with all of them as ``--adapter``, ``--max-adapters 100``, ``--threads 1``,
``--max-batch 16``. Traffic: rounds of ``--round`` greedy completions of 12 tokens, 16 in flight,
alternating (interleaved in one run) between

* **few**: every request on one of 4 adapters (always resident), and
* **all**: every request on an adapter drawn uniformly from all of them (≈ 90% are not resident:
  each one is made resident, and another evicted, between decode steps).

Reports requests/s of each, their ratio (the target is ≥ 0.9), errors (the target is 0), the
server's residency counters, its resident memory, and the registration time against the number
of adapters already registered (read off the server's startup timing, ``GET /v1/stats``).

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py                 # 1,000 adapters, 6 rounds each
    python benchmarks/bench_scale.py --src /path/to/other/src           # the same against another tree
    python benchmarks/bench_scale.py --model smollm2-135m-instruct --targets q_proj,v_proj   # the real model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

PROMPTS = ["the red cat is", "hello world", "tell me a good answer", "one two three", "the sun and the moon",
           "a big dog", "serve the model", "what is the question"]


def build(folder: Path, adapters: int, rank: int = 8, model_name: str | None = None,
          targets: str = "all-linear") -> dict:
    """Base model + `adapters` random LoRA folders (one LoraModel, re-randomised per save).

    The base is the random Llama, or with `model_name` a real checkpoint (e.g. smollm2-135m-instruct,
    served from its own folder).
    """
    import lorakit

    if model_name is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_serve import build_demo_models

        base_dir = build_demo_models(folder, adapters=0, hidden=256, layers=2, vocab=4096)["base"]
    else:
        from lorakit.models import resolve_base

        base_dir = Path(resolve_base(model_name))
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    target = targets if targets == "all-linear" else targets.split(",")
    model = lorakit.get_lora_model(base, lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target))
    g = torch.Generator().manual_seed(0)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for i in range(adapters):
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(folder / "adapters" / f"ad{i}")
    (folder / "base.txt").write_text(str(base_dir))
    return {"base": base_dir, "adapters": [folder / "adapters" / f"ad{i}" for i in range(adapters)]}


def start_server(dirs: dict, args, src: str | None) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit", "serve", "--base", str(dirs["base"]), "--served-model-name", "base",
           "--port", str(port), "--threads", "1", "--max-batch", "16", "--max-adapters", str(args.max_adapters),
           "--log-level", "warning"]
    if args.max_adapter_memory:
        cmd += ["--max-adapter-memory", args.max_adapter_memory]
    args_file = None
    for i, path in enumerate(dirs["adapters"]):
        cmd += ["--adapter", f"ad{i}={path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if src:
        env["PYTHONPATH"] = src
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - start < 900:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - start
        except httpx.TransportError:
            time.sleep(0.5)
    del args_file
    proc.terminate()
    raise RuntimeError("server did not become ready")


async def one_round(client: httpx.AsyncClient, models: list[str], concurrency: int) -> tuple[float, int, list]:
    sem = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def fire(i: int, model: str) -> None:
        async with sem:
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 12, "temperature": 0,
                    "ignore_eos": True}
            try:
                r = await client.post("/v1/completions", json=body)
                if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != 12:
                    errors.append(f"{model}: HTTP {r.status_code} {r.text[:120]}")
            except Exception as exc:  # counted; the run goes on
                errors.append(f"{model}: {exc!r}")

    start = time.perf_counter()
    await asyncio.gather(*(fire(i, m) for i, m in enumerate(models)))
    return time.perf_counter() - start, len(models), errors


async def traffic(url: str, n_adapters: int, rounds: int, per_round: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    out = {"few": {"s": 0.0, "n": 0}, "all": {"s": 0.0, "n": 0}}
    errors: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=20)) as client:
        await one_round(client, [f"ad{i % 4}" for i in range(16)], 16)  # warm-up (and the 4 become resident)
        for _ in range(rounds):
            for kind in ("few", "all"):
                models = ([f"ad{rng.randrange(4)}" for _ in range(per_round)] if kind == "few"
                          else [f"ad{rng.randrange(n_adapters)}" for _ in range(per_round)])
                seconds, n, errs = await one_round(client, models, 16)
                out[kind]["s"] += seconds
                out[kind]["n"] += n
                errors += errs
        stats = (await client.get("/v1/stats")).json()
    return {"req_s_few": out["few"]["n"] / out["few"]["s"], "req_s_all": out["all"]["n"] / out["all"]["s"],
            "errors": len(errors), "error_samples": errors[:3], "stats": stats}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--max-adapters", type=int, default=100)
    parser.add_argument("--max-adapter-memory", help="pass --max-adapter-memory to the server")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each kind, interleaved")
    parser.add_argument("--round", type=int, default=64, dest="per_round", help="requests per round")
    parser.add_argument("--src", help="PYTHONPATH for the server (e.g. another checkout's src) ")
    parser.add_argument("--workdir", help="keep the models here (default: a temporary folder)")
    parser.add_argument("--json", help="write the report here too")
    parser.add_argument("--model", help="serve this checkpoint instead of the random Llama "
                                        "(e.g. smollm2-135m-instruct)")
    parser.add_argument("--targets", default="all-linear", help="the adapters' target modules, comma-separated")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tmp = None
    if args.workdir:
        folder = Path(args.workdir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-scale-")
        folder = Path(tmp.name)
    t0 = time.perf_counter()
    if (folder / "adapters" / f"ad{args.adapters - 1}").exists() and (folder / "base.txt").exists():
        dirs = {"base": Path((folder / "base.txt").read_text()),
                "adapters": [folder / "adapters" / f"ad{i}" for i in range(args.adapters)]}
    else:
        dirs = build(folder, args.adapters, model_name=args.model, targets=args.targets)
    print(f"built {args.adapters} adapters in {time.perf_counter() - t0:.1f} s", flush=True)
    proc, url, startup = start_server(dirs, args, args.src)
    try:
        rss_start = rss_mb(proc.pid)
        report = asyncio.run(traffic(url, args.adapters, args.rounds, args.per_round))
        report.update(startup_s=startup, rss_mb_after_startup=rss_start, rss_mb_after_traffic=rss_mb(proc.pid),
                      ratio_all_over_few=report["req_s_all"] / report["req_s_few"], adapters=args.adapters,
                      max_adapters=args.max_adapters)
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
