"""~300 hostile requests against a real `lorakit serve` process: malformed bodies, wrong types,
deep nesting, surrogates, raw malformed HTTP, slow clients, broken adapter folders and symlink
escapes through the admin API. Zero 5xx for invalid input, zero engine deaths, zero loads from
outside --adapter-root; every error an OpenAI error object (README promise); and the same greedy
outputs after the attack as before it."""

from __future__ import annotations

import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from generators import ADMIN_BODIES, RAW_HTTP, adapter_folders, http_bodies
from serve_helpers import ServerProcess, save_adapter, save_base

KEY = {"Authorization": "Bearer k"}
PROMPTS = ["hello world", "the cat is", "one two three"]
BODY_TIMEOUT = 1.5


def is_openai_error(r: httpx.Response) -> bool:
    try:
        error = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error) and bool(error["message"])


def outcome(r: httpx.Response, expect_error: bool = True) -> str:
    if r.status_code >= 500:
        return "http_5xx"
    if r.status_code >= 400:
        return "refused" if is_openai_error(r) else "unclear"
    return "served"


def greedy(http: httpx.Client, model: str) -> list[str]:
    return [http.post("/v1/completions", json={"model": model, "prompt": p, "max_tokens": 6, "temperature": 0})
            .json()["choices"][0]["text"] for p in PROMPTS]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    base = save_base(tmp / "base")
    root = tmp / "root"
    good = save_adapter(base, root / "good", seed=1)
    outside = save_adapter(base, tmp / "outside", seed=2, r=6)  # the canary: must never be served
    server = ServerProcess(["--base", str(base), "--served-model-name", "base", "--adapter", f"a={good}",
                            "--api-key", "k", "--adapter-root", str(root), "--max-adapters", "4",
                            "--body-timeout", str(BODY_TIMEOUT), "--request-timeout", "60"])
    http = httpx.Client(base_url=server.url, headers=KEY, timeout=60)
    try:
        yield {"tmp": tmp, "base": base, "root": root, "good": good, "outside": outside, "server": server,
               "http": http}
    finally:
        http.close()
        server.close()


@pytest.mark.slow
def test_promise_every_error_is_an_openai_error_object_and_the_server_survives_an_attack(setup, tally):
    http, server, root, outside = setup["http"], setup["server"], setup["root"], setup["outside"]
    before = {m: greedy(http, m) for m in ("base", "a")}
    # the canary's own outputs, from a throwaway server-side name loaded legitimately (copied inside)
    shutil.copytree(outside, root / "canary-copy")
    assert http.post("/v1/adapters", json={"name": "canary", "path": "canary-copy"}).status_code == 200
    canary = greedy(http, "canary")
    assert http.delete("/v1/adapters/canary").status_code == 200
    shutil.rmtree(root / "canary-copy")
    assert canary != before["a"] and canary != before["base"]

    def check_health(area: str) -> None:
        r = http.get("/health")
        if r.status_code != 200 or not server.alive():
            tally.record(area, "engine_death", f"/health {r.status_code}")

    # 1. hostile bodies
    for name, path, raw in http_bodies():
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
        tally.record("HTTP bodies", outcome(r), f"{name}: {r.status_code} {r.text[:200]}")
    check_health("HTTP bodies")
    # 2. hostile admin requests
    for body in ADMIN_BODIES:
        r = http.post("/v1/adapters", json=body)
        tally.record("HTTP admin bodies", outcome(r), f"{body}: {r.status_code} {r.text[:200]}")
        if r.status_code == 200:
            http.delete(f"/v1/adapters/{body['name']}")
    check_health("HTTP admin bodies")
    # 3. broken adapter folders under the root
    for i, (name, folder) in enumerate(adapter_folders(setup["good"], root / "broken", seed=7, config_cases=40)):
        r = http.post("/v1/adapters", json={"name": f"b{i}", "path": str(folder.relative_to(root))})
        tally.record("HTTP admin loads of broken folders", outcome(r), f"{name}: {r.status_code} {r.text[:200]}")
        if r.status_code == 200:
            ok = http.post("/v1/completions", json={"model": f"b{i}", "prompt": "hello", "max_tokens": 2})
            if ok.status_code >= 500:
                tally.record("HTTP admin loads of broken folders", "http_5xx", f"{name}: served then {ok.text[:200]}")
            http.delete(f"/v1/adapters/b{i}")
    check_health("HTTP admin loads of broken folders")
    # 4. escapes from the adapter root
    (root / "link-dir").symlink_to(outside, target_is_directory=True)
    (root / "link-files").mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "link-files" / f).symlink_to(outside / f)
    (root / "link-weights").mkdir()
    shutil.copy(outside / "adapter_config.json", root / "link-weights")
    (root / "link-weights" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    attempts = ["link-dir", "link-files", "link-weights", str(outside), "../outside", "good/../../outside",
                "link-dir/.", "./link-dir", "//" + str(outside).lstrip("/"), str(root / "link-dir")]
    area = "HTTP adapter-root escapes"
    for i, path in enumerate(attempts):
        r = http.post("/v1/adapters", json={"name": f"e{i}", "path": path})
        tally.record(area, outcome(r), f"{path}: {r.status_code}")
        if r.status_code == 200:
            if greedy(http, f"e{i}") == canary:
                tally.record(area, "read_outside_root", path)
            http.delete(f"/v1/adapters/e{i}")
    # registered while inside, swapped for a symlink afterwards (reload after eviction / first use)
    shutil.copytree(setup["good"], root / "swap")
    r = http.post("/v1/adapters", json={"name": "swap", "path": "swap", "load": False})
    assert r.status_code == 200
    shutil.rmtree(root / "swap")
    (root / "swap").symlink_to(outside, target_is_directory=True)
    r = http.post("/v1/completions", json={"model": "swap", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0})
    tally.record(area, outcome(r), f"swap after registration: {r.status_code} {r.text[:200]}")
    if r.status_code == 200 and r.json()["choices"][0]["text"] == canary[0]:
        tally.record(area, "read_outside_root", "swap after registration")
    check_health(area)
    # 5. raw malformed HTTP
    for raw in RAW_HTTP:
        status, body = raw_exchange(server.port, raw)
        ok = status is not None and 400 <= status < 500 and _json_error(body)
        tally.record("raw malformed HTTP", "refused" if ok else ("http_5xx" if status and status >= 500 else "unclear"),
                     f"{raw[:40]!r}: {status} {body[:120]!r}")
    check_health("raw malformed HTTP")
    # 6. slow clients: headers or body that never finish must not hold connections
    slow = [slow_client(server.port, part) for part in [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"] * 10
            + [b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
               b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo"] * 10]
    time.sleep(BODY_TIMEOUT + 2.5)
    for sock in slow:
        closed, data = drained(sock)
        ok = closed and (not data or _json_error(data.split(b"\r\n\r\n", 1)[-1]))
        tally.record("slow clients", "refused" if ok else "unclear", f"closed={closed} {data[:120]!r}")
    check_health("slow clients")
    # 7. concurrency while all of the above settled: mixed adapters, greedy, streaming
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: http.post("/v1/completions", json={
            "model": ("a", "base")[i % 2], "prompt": PROMPTS[i % 3], "max_tokens": 6, "temperature": 0,
            "stream": i % 4 == 0}), range(24)))
    for r in results:
        tally.record("concurrent valid requests", "served" if r.status_code == 200 else outcome(r), r.text[:200])
    check_health("concurrent valid requests")
    # the promise at the end: same greedy outputs as before the attack
    after = {m: greedy(http, m) for m in ("base", "a")}
    if after != before:
        tally.record("greedy outputs after the attack", "model_changed", f"{before} -> {after}")
    else:
        tally.record("greedy outputs after the attack", "served")
    assert server.alive()
    bad = [b for b in tally.bad("HTTP") + tally.bad("raw") + tally.bad("slow") + tally.bad("concurrent")
           + tally.bad("greedy")]
    assert bad == []


def _json_error(body: bytes) -> bool:
    try:
        error = json.loads(body.decode("utf-8"))["error"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return False
    return isinstance(error, dict) and "message" in error


def raw_exchange(port: int, raw: bytes) -> tuple[int | None, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(raw)
        except OSError:
            pass
        data = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ")[1])
    except (IndexError, ValueError):
        return None, data
    return status, body


def slow_client(port: int, partial: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(partial)
    return sock


def drained(sock: socket.socket) -> tuple[bool, bytes]:
    """(closed by the server, what it sent)."""
    sock.settimeout(0.5)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True, data
            data += chunk
    except TimeoutError:
        return False, data
    except OSError:
        return True, data
    finally:
        sock.close()
