"""Operations on a real `python -m lorakit serve` process: /metrics, the access log, drain on SIGTERM,
a clean restart with the same adapters, and two replicas on one --adapter-root answering alike."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from serve_helpers import ServerProcess, shared_model_dirs

prometheus_parser = pytest.importorskip("prometheus_client.parser")

PROMPT = "tell me the answer"  # must never appear in the access log


@pytest.fixture(scope="module")
def dirs():
    return shared_model_dirs()


def _args(dirs, *extra):
    return ["--base", str(dirs["base"]), "--served-model-name", "base", "--adapter", f"a={dirs['a']}",
            "--adapter", f"b={dirs['b']}", "--adapter-root", str(dirs["root"]), "--max-adapters", "1", *extra]


def _complete(http: httpx.Client, model: str, max_tokens: int = 8, **extra) -> dict:
    r = http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                           "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def _metrics(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in prometheus_parser.text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _access_lines(server: ServerProcess) -> list[dict]:
    lines = []
    for line in server.output().splitlines():
        if line.startswith("{") and '"request_id"' in line:
            lines.append(json.loads(line))
    return lines


@pytest.mark.slow
def test_metrics_and_access_log_count_what_was_served(dirs):
    server = ServerProcess(_args(dirs))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            used = [_complete(http, m)["usage"] for m in ("a", "b", "base", "a")]
            assert http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
            m = _metrics(http)
        ok = (("route", "/v1/completions"), ("status", "200"))
        assert m[("lorakit_http_requests_total", ok)] == 4
        assert m[("lorakit_http_requests_total", (("route", "/v1/completions"), ("status", "404")))] == 1
        assert m[("lorakit_http_request_duration_seconds_count", (("route", "/v1/completions"),))] == 5
        assert m[("lorakit_generated_tokens_total", ())] == sum(u["completion_tokens"] for u in used)
        assert m[("lorakit_prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in used)
        # --max-adapters 1 and a, b, a: three residencies, two evictions; the folders were read once each
        assert m[("lorakit_adapter_loads_total", ())] == 3
        assert m[("lorakit_adapter_evictions_total", ())] == 2
        assert m[("lorakit_adapter_reads_total", ())] == 2
        assert m[("lorakit_adapters_resident", ())] == 1 and m[("lorakit_adapters_registered", ())] == 2
        assert m[("lorakit_queue_depth", ())] == 0 and m[("lorakit_engine_alive", ())] == 1
        assert m[("lorakit_adapter_host_bytes", ())] > 0
        lines = _access_lines(server)
        served = [x for x in lines if x["path"] == "/v1/completions"]
        assert [x["status"] for x in served] == [200, 200, 200, 200, 404]
        assert [x.get("model") for x in served] == ["a", "b", "base", "a", "nope"]
        assert [x["usage"] for x in served[:4]] == used
        assert len({x["request_id"] for x in lines}) == len(lines)
        assert PROMPT not in server.output() and "answer" not in json.dumps(lines)  # no prompt text
    finally:
        server.close()


@pytest.mark.slow
def test_sigterm_drains_running_requests_refuses_new_ones_and_restarts_clean(dirs):
    args = _args(dirs, "--max-batch", "1", "--drain-timeout", "120")
    server = ServerProcess(args)
    with httpx.Client(base_url=server.url, timeout=120) as http:
        before = {m: _complete(http, m, 12)["choices"][0]["text"] for m in ("a", "b", "base")}
    results: dict[int, dict] = {}

    def long_request(i: int) -> None:  # batch 1: they run one after the other (the tiny model's context is 128)
        with httpx.Client(base_url=server.url, timeout=120) as http:
            r = http.post("/v1/completions", json={"model": "ab"[i % 2], "prompt": PROMPT, "max_tokens": 100,
                                                   "temperature": 0, "ignore_eos": True})
            results[i] = {"status": r.status_code, "tokens": r.json().get("usage", {}).get("completion_tokens")}

    threads = [threading.Thread(target=long_request, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        deadline = time.monotonic() + 30
        def accepted(m) -> float:  # running or queued: every request reached the engine before the signal
            return m[("lorakit_running_rows", ())] + m[("lorakit_queue_depth", ())]

        while accepted(_metrics(http)) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert accepted(_metrics(http)) == len(threads), "the requests did not all reach the engine in 30 s"
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = http.post("/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 2})
        health = http.get("/health")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert health.status_code == 503
    assert server.proc.wait(timeout=150) == 0  # drained, then a normal exit
    for t in threads:
        t.join(timeout=10)
    assert results == {i: {"status": 200, "tokens": 100} for i in range(5)}  # every running request finished
    assert "drained (all requests finished)" in server.output()
    server.close()

    again = ServerProcess(args)  # the same flags, the same port free again: the same adapters, same outputs
    try:
        with httpx.Client(base_url=again.url, timeout=60) as http:
            after = {m: _complete(http, m, 12)["choices"][0]["text"] for m in ("a", "b", "base")}
        assert after == before
    finally:
        again.close()


@pytest.mark.slow
def test_two_replicas_on_one_adapter_root_answer_alike(dirs):
    """No state lives in a replica that another needs: an adapter loaded by name from the shared root
    on each replica gives the same greedy text as on the other (and the mixed batch path agrees)."""
    replicas = [ServerProcess(_args(dirs, "--api-key", "k")) for _ in range(2)]
    auth = {"Authorization": "Bearer k"}
    try:
        texts = []
        for server in replicas:
            with httpx.Client(base_url=server.url, timeout=60, headers=auth) as http:
                r = http.post("/v1/adapters", json={"name": "c", "path": "c"})
                assert r.status_code == 200, r.text
                texts.append({m: _complete(http, m, 12)["choices"][0]["text"] for m in ("a", "c", "base")})
        assert texts[0] == texts[1]
        assert len(set(texts[0].values())) == 3  # the adapters really differ
    finally:
        for server in replicas:
            server.close()
