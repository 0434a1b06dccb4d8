"""Against a real `python -m lorakit serve` process on a loopback port: the official openai client,
every kind of bad request (right status, OpenAI error shape, server still serving), adapter
load / unload / LRU, and concurrent mixed-adapter greedy outputs equal to single-request ones."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_helpers import ServerProcess, shared_model_dirs

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CAP = 64
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def dirs():
    return shared_model_dirs()


@pytest.fixture(scope="module")
def server(dirs):
    srv = ServerProcess(["--base", str(dirs["base"]), "--served-model-name", "base",
                         "--adapter", f"a={dirs['a']}", "--adapter", f"b={dirs['b']}",
                         "--adapter-root", str(dirs["root"]), "--api-key", KEY, "--max-adapters", "2",
                         "--max-tokens-cap", str(CAP), "--max-body-bytes", str(BODY_LIMIT), "--max-batch", "8"])
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def complete(http: httpx.Client, model: str, prompt: str, max_tokens: int = 12) -> str:
    r = http.post("/v1/completions", headers=AUTH,
                  json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_openai_client_models_completions_and_chat(client):
    ids = [m.id for m in client.models.list()]
    assert ids[:3] == ["base", "a", "b"]
    r = client.completions.create(model="a", prompt="hello world the cat", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.model == "a" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == 4 and r.usage.total_tokens == 4 + r.usage.completion_tokens
    chat = client.chat.completions.create(model="b", messages=[{"role": "system", "content": "be good"},
                                                               {"role": "user", "content": "hello"}],
                                          max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str) and chat.usage.completion_tokens >= 1
    base = client.completions.create(model="base", prompt="hello world the cat", max_tokens=10, temperature=0)
    assert base.choices[0].text != r.choices[0].text  # the adapter changes the output


def test_openai_client_streaming_matches_non_streaming(client):
    messages = [{"role": "user", "content": "tell me a good answer"}]
    full = client.chat.completions.create(model="a", messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="a", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    plain = client.completions.create(model="b", prompt="the sky is", max_tokens=12, temperature=0)
    streamed = list(client.completions.create(model="b", prompt="the sky is", max_tokens=12, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_raw_sse_ends_with_done(http):
    with http.stream("POST", "/v1/completions", headers=AUTH,
                     json={"model": "a", "prompt": "hello", "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_openai_client_reads_logprobs_echo_and_n(client):
    scored = client.completions.create(model="a", prompt="hello world the cat", max_tokens=0, echo=True, logprobs=2)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "hello world the cat" and lp.token_logprobs[0] is None
    assert len(lp.tokens) == 4 and all(len(top) >= 2 for top in lp.top_logprobs[1:]) and lp.text_offset[0] == 0
    chat = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hello"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2, n=2)
    assert [c.index for c in chat.choices] == [0, 1]
    for c in chat.choices:
        first = c.logprobs.content[0]
        assert len(first.top_logprobs) == 2 and first.logprob == first.top_logprobs[0].logprob
        assert bytes(first.bytes).decode() == first.token


def test_stop_strings_seed_and_token_prompts(client):
    full = client.completions.create(model="a", prompt="hello world", max_tokens=16, temperature=0).choices[0].text
    words = full.split()
    if len(words) >= 3:
        stop = " " + words[2]
        cut = client.completions.create(model="a", prompt="hello world", max_tokens=16, temperature=0, stop=[stop])
        assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    kw = dict(model="b", prompt=[5, 69, 70], max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


BAD_REQUESTS = [
    # (name, method, path, kwargs, status, code)
    ("malformed json", "POST", "/v1/completions", dict(content=b'{"model": "a", '), 400, "invalid_json"),
    ("json not an object", "POST", "/v1/completions", dict(json=["a"]), 400, "invalid_json"),
    ("missing field", "POST", "/v1/completions", dict(json={"model": "a"}), 422, "invalid_value"),
    ("wrong type", "POST", "/v1/completions", dict(json={"model": "a", "prompt": "x", "max_tokens": "lots"}), 422,
     "invalid_value"),
    ("temperature out of range", "POST", "/v1/chat/completions",
     dict(json={"model": "a", "messages": [{"role": "user", "content": "x"}], "temperature": 9}), 422, "invalid_value"),
    ("empty messages", "POST", "/v1/chat/completions", dict(json={"model": "a", "messages": []}), 422,
     "invalid_value"),
    ("bad role", "POST", "/v1/chat/completions",
     dict(json={"model": "a", "messages": [{"role": "robot", "content": "x"}]}), 422, "invalid_value"),
    ("n over the sequence limit", "POST", "/v1/completions", dict(json={"model": "a", "prompt": "x", "n": 100}), 400,
     "invalid_request"),
    ("max_tokens over cap", "POST", "/v1/completions", dict(json={"model": "a", "prompt": "x", "max_tokens": CAP + 1}),
     400, "invalid_request"),
    ("token id out of range", "POST", "/v1/completions", dict(json={"model": "a", "prompt": [1, 99999]}), 400,
     "invalid_request"),
    ("prompt longer than context", "POST", "/v1/completions", dict(json={"model": "a", "prompt": [5] * 200}), 400,
     "context_length_exceeded"),
    ("unknown model", "POST", "/v1/completions", dict(json={"model": "nope", "prompt": "x"}), 404, "model_not_found"),
    ("bad mixture", "POST", "/v1/completions", dict(json={"model": "mix:a=lots", "prompt": "x"}), 400,
     "invalid_mixture"),
    ("mixture of unknown", "POST", "/v1/completions", dict(json={"model": "mix:a=0.5,zz=0.5", "prompt": "x"}), 404,
     "model_not_found"),
    ("unknown route", "GET", "/v1/nothing", {}, 404, "not_found"),
    ("wrong method", "GET", "/v1/completions", {}, 405, None),
    ("admin bad name", "POST", "/v1/adapters", dict(json={"name": "../x", "path": "a"}), 400, "invalid_name"),
    ("admin traversal", "POST", "/v1/adapters", dict(json={"name": "x", "path": "../base"}), 403, "path_outside_root"),
    ("admin absolute outside", "POST", "/v1/adapters", dict(json={"name": "x", "path": "/etc"}), 403,
     "path_outside_root"),
    ("admin missing path", "POST", "/v1/adapters", dict(json={"name": "x", "path": "nothing/here"}), 404, "not_found"),
    ("admin name taken", "POST", "/v1/adapters", dict(json={"name": "a", "path": "c"}), 409, "conflict"),
    ("admin unknown field", "POST", "/v1/adapters", dict(json={"name": "x", "path": "c", "evil": 1}), 422,
     "invalid_value"),
    ("delete unknown", "DELETE", "/v1/adapters/zz", {}, 404, "adapter_not_found"),
]


@pytest.mark.parametrize("name,method,path,kwargs,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_openai_error_and_server_keeps_serving(http, name, method, path, kwargs, status, code):
    r = http.request(method, path, headers=AUTH, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    assert http.get("/health").status_code == 200


def test_auth_and_body_limit(http, client, server):
    body = {"model": "a", "prompt": "hello", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + KEY}):
        r = http.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert http.get("/v1/models").status_code == 401
    assert http.post("/v1/adapters", json={"name": "x", "path": "c"}).status_code == 401
    r = http.post("/v1/completions", headers=AUTH, json={**body, "prompt": "x " * BODY_LIMIT})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = http.post("/v1/completions", headers=AUTH, content=iter([b"{", b" " * BODY_LIMIT, b"}"]))
    assert chunked.status_code == 413
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x", max_tokens=2)
    assert http.post("/v1/completions", json=body, headers=AUTH).status_code == 200
    assert server.alive()


def test_load_unload_and_lru(http, server):
    before = complete(http, "a", "the red cat")
    r = http.post("/v1/adapters", headers=AUTH, json={"name": "c", "path": "c"})
    assert r.status_code == 200 and r.json()["loaded"] is True
    listed = {a["id"]: a["loaded"] for a in http.get("/v1/adapters", headers=AUTH).json()["data"]}
    assert sum(listed.values()) == 2 and listed["c"] and "c" in [m["id"] for m in
                                                                   http.get("/v1/models", headers=AUTH).json()["data"]]
    loads = http.get("/v1/stats", headers=AUTH).json()["adapter_loads"]
    complete(http, "c", "the red cat")
    assert complete(http, "a", "the red cat") == before  # "a" may have been evicted: reloaded on demand
    complete(http, "b", "the red cat")
    assert http.get("/v1/stats", headers=AUTH).json()["adapter_loads"] > loads
    assert http.post("/v1/adapters", headers=AUTH, json={"name": "c", "path": "c"}).status_code == 200  # idempotent
    assert http.delete("/v1/adapters/c", headers=AUTH).status_code == 200
    r = http.post("/v1/completions", headers=AUTH, json={"model": "c", "prompt": "x"})
    assert r.status_code == 404
    assert "c" not in [m["id"] for m in http.get("/v1/models", headers=AUTH).json()["data"]]
    assert server.alive()


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlink_out_of_root_is_refused(http, dirs, tmp_path):
    link = dirs["root"] / "sneaky"
    if not link.exists():
        link.symlink_to(dirs["base"], target_is_directory=True)
    r = http.post("/v1/adapters", headers=AUTH, json={"name": "sneaky", "path": "sneaky"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "path_outside_root"


def test_concurrent_mixed_adapter_greedy_equals_single(http):
    prompts = ["the red cat", "hello world", "one two three four five", "big dog", "tell me", "the sun is hot",
               "a", "we run and walk"]
    models = ["a", "b", "base", "mix:a=0.6,b=0.4"]
    jobs = [(models[i % 4], p, 10 + i) for i, p in enumerate(prompts)]
    alone = [complete(http, m, p, n) for m, p, n in jobs]
    steps = http.get("/v1/stats", headers=AUTH).json()["engine"]
    def own_client(job):  # one connection per thread
        with httpx.Client(base_url=str(http.base_url), timeout=60) as c:
            return complete(c, *job)

    for _ in range(2):
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(own_client, jobs))
        assert together == alone
    stats = http.get("/v1/stats", headers=AUTH).json()["engine"]
    assert stats["max_rows"] >= 2 and stats["steps"] > steps["steps"] and stats["failures"] == 0


def test_load_test_script_reports_zero_errors(server):
    import asyncio
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import load_test

    report = asyncio.run(load_test.run_load(server.url, KEY, requests=24, concurrency=8, max_seconds=60,
                                            max_tokens=8, models=["a", "b", "base"], check=True, stream_every=3))
    assert report["errors"] == 0 and report["completed"] == 24, report["error_samples"]
    assert report["latency_p50_s"] <= report["latency_p99_s"] and report["engine"]["max_rows"] >= 2


def test_broken_adapter_folders_are_refused_with_400(http, dirs, server):
    import shutil

    from safetensors.torch import load_file, save_file

    nan_dir, junk_dir = dirs["root"] / "has_nan", dirs["root"] / "junk"
    for folder in (nan_dir, junk_dir):
        if not folder.exists():
            shutil.copytree(dirs["c"], folder)
    weights = load_file(nan_dir / "adapter_model.safetensors")
    first = sorted(weights)[0]
    weights[first] = torch_full_like_nan(weights[first])
    save_file(weights, nan_dir / "adapter_model.safetensors")
    (junk_dir / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    for name, path in (("has_nan", "has_nan"), ("junk", "junk")):
        r = http.post("/v1/adapters", headers=AUTH, json={"name": name, "path": path})
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_load_failed", r.text
        assert http.post("/v1/completions", headers=AUTH, json={"model": name, "prompt": "x"}).status_code == 404
    assert complete(http, "b", "hello") and server.alive()


def torch_full_like_nan(tensor):
    import torch

    return torch.full_like(tensor, float("nan"))
