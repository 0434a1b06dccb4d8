"""Bounded load test for `lorakit serve`: concurrent requests across several adapters, loopback only.

Fires a fixed number of requests (``--requests``) with ``--concurrency`` in flight, spread over the
server's adapters (and the base), stops at ``--max-seconds`` whatever happens, and reports
throughput, latency percentiles and errors. With ``--check`` (default) every greedy output is
compared with the same request sent alone before the load phase: a mismatch counts as an error.
The bar is zero errors.

    python benchmarks/load_test.py                       # spawns a server on a small random model
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --api-key KEY   # an existing local server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPTS = ["the red cat is", "hello world", "tell me a good answer", "one two three", "the sun and the moon",
           "a big dog", "serve the model", "what is the question", "the sky is blue and", "merge the adapter"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def _one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, stream: bool,
               headers: dict) -> tuple[str, int]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if not stream:
        r = await client.post("/v1/completions", json=body, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        data = r.json()
        return data["choices"][0]["text"], data["usage"]["completion_tokens"]
    text, used = "", 0
    body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']['message']}")
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
    return text, used


async def run_load(url: str, api_key: str | None, requests: int, concurrency: int, max_seconds: float,
                   max_tokens: int, models: list[str] | None, check: bool, stream_every: int) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, timeout=max_seconds, limits=limits) as client:
        if models is None:
            listed = (await client.get("/v1/models", headers=headers)).json()["data"]
            models = [m["id"] for m in listed]
        jobs = [(models[i % len(models)], PROMPTS[i % len(PROMPTS)], max_tokens - i % 4) for i in range(requests)]
        expected = {}
        if check:  # reference: each distinct request alone
            for job in dict.fromkeys(jobs):
                expected[job] = (await _one(client, *job, stream=False, headers=headers))[0]
        latencies: list[float] = []
        errors: list[str] = []
        tokens = 0
        sem = asyncio.Semaphore(concurrency)

        async def fire(i: int, job) -> None:
            nonlocal tokens
            async with sem:
                start = time.perf_counter()
                try:
                    text, n = await _one(client, *job, stream=stream_every > 0 and i % stream_every == 0,
                                         headers=headers)
                except Exception as exc:  # counted, reported; the run goes on
                    errors.append(f"{job[0]}: {exc}")
                    return
                latencies.append(time.perf_counter() - start)
                tokens += n
                if check and text != expected[job]:
                    errors.append(f"{job[0]}: output under load differs from the single-request output")

        start = time.perf_counter()
        tasks = [asyncio.create_task(fire(i, job)) for i, job in enumerate(jobs)]
        done, pending = await asyncio.wait(tasks, timeout=max_seconds)
        for task in pending:
            task.cancel()
        wall = time.perf_counter() - start
        stats = (await client.get("/v1/stats", headers=headers)).json()
    return {"requests": requests, "completed": len(latencies), "errors": len(errors) + len(pending),
            "timed_out": len(pending), "error_samples": errors[:5], "wall_s": wall,
            "throughput_req_s": len(latencies) / wall, "throughput_tok_s": tokens / wall,
            "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99),
            "latency_max_s": max(latencies, default=float("nan")), "models": models, "concurrency": concurrency,
            "checked_against_single": check, "engine": stats.get("engine")}


def spawn_server(threads: int, max_batch: int) -> tuple[subprocess.Popen, str, tempfile.TemporaryDirectory]:
    """A server on a free loopback port, serving a small random Llama with 4 adapters."""
    import socket

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_serve import build_demo_models

    tmp = tempfile.TemporaryDirectory(prefix="load-test-")
    dirs = build_demo_models(Path(tmp.name), hidden=256, layers=2, vocab=4096)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "lorakit", "serve", "--base", str(dirs["base"]), "--served-model-name", "base",
           "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads), "--max-batch", str(max_batch),
           "--log-level", "warning"]
    for name in ("ad0", "ad1", "ad2", "ad3"):
        cmd += ["--adapter", f"{name}={dirs[name]}"]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, tmp
        except httpx.TransportError:
            time.sleep(0.25)
    proc.terminate()
    raise RuntimeError("server did not become ready in 120 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server on this machine (default: spawn one)")
    parser.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"))
    parser.add_argument("--requests", type=int, default=200, help="requests in total (fixed)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="wall-clock cap for the load phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--models", help="comma-separated model ids (default: all the server lists)")
    parser.add_argument("--stream-every", type=int, default=4, help="every k-th request streams (0: none)")
    parser.add_argument("--no-check", action="store_true", help="skip comparing with single-request outputs")
    parser.add_argument("--threads", type=int, default=1, help="spawned server's torch threads")
    parser.add_argument("--max-batch", type=int, default=16, help="spawned server's batch width")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.requests > 100_000 or args.concurrency < 1 or args.concurrency > 1024:
        parser.error("--requests must be 1..100000 and --concurrency 1..1024")

    proc = tmp = None
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            parser.error("--url must be a loopback address (127.0.0.1 / localhost / ::1): this is a local load test")
        url = args.url.rstrip("/")
    else:
        proc, url, tmp = spawn_server(args.threads, args.max_batch)
    try:
        report = asyncio.run(run_load(url, args.api_key, args.requests, args.concurrency, args.max_seconds,
                                      args.max_tokens, args.models.split(",") if args.models else None,
                                      not args.no_check, args.stream_every))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
            tmp.cleanup()
    print(f"{report['completed']}/{report['requests']} requests in {report['wall_s']:.1f} s over "
          f"{len(report['models'])} models, concurrency {report['concurrency']}")
    print(f"  throughput  {report['throughput_req_s']:.2f} req/s, {report['throughput_tok_s']:.1f} generated tok/s")
    print(f"  latency     p50 {report['latency_p50_s'] * 1000:.0f} ms, p99 {report['latency_p99_s'] * 1000:.0f} ms, "
          f"max {report['latency_max_s'] * 1000:.0f} ms")
    print(f"  errors      {report['errors']} (timed out: {report['timed_out']}; outputs checked against "
          f"single requests: {report['checked_against_single']})")
    for sample in report["error_samples"]:
        print(f"    {sample}")
    if report["engine"]:
        e = report["engine"]
        print(f"  engine      {e['steps']} decode steps, up to {e['max_rows']} rows and {e['max_adapters']} "
              f"adapters in one step")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
