"""The app in process (no socket): paths a live server can't reach deterministically — timeouts,
a full queue, admin endpoints without a key — and the CLI's argument errors."""

from __future__ import annotations

import argparse

import pytest
import torch
from fastapi.testclient import TestClient
from serve_helpers import shared_model_dirs

from lorakit.cli import run_command
from lorakit.serve import cli


@pytest.fixture(scope="module")
def dirs():
    threads = torch.get_num_threads()
    yield shared_model_dirs()
    torch.set_num_threads(threads)  # build_app(--threads 1) sets the process-wide value


def make_app(dirs, *extra: str):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--base", str(dirs["base"]), "--served-model-name", "base",
                              "--adapter", f"a={dirs['a']}", "--threads", "1", *extra])
    return cli.build_app(args)


BODY = {"model": "a", "prompt": "hello world", "max_tokens": 4, "temperature": 0}


def test_without_api_key_inference_is_open_and_admin_is_off(dirs):
    with TestClient(make_app(dirs, "--adapter-root", str(dirs["root"]))) as client:  # lifespan: engine runs
        r = client.post("/v1/completions", json=BODY)
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        for method, path, kw in (("POST", "/v1/adapters", {"json": {"name": "c", "path": "c"}}),
                                 ("GET", "/v1/adapters", {}), ("DELETE", "/v1/adapters/a", {})):
            r = client.request(method, path, **kw)
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert client.post("/v1/completions", json=BODY).status_code == 200


def test_runtime_loading_needs_an_adapter_root(dirs):
    with TestClient(make_app(dirs, "--api-key", "k")) as client:
        r = client.post("/v1/adapters", json={"name": "c", "path": str(dirs["c"])},
                        headers={"Authorization": "Bearer k"})
        assert r.status_code == 403 and "--adapter-root" in r.json()["error"]["message"]


def test_request_timeout_is_408_and_frees_the_request(dirs):
    client = TestClient(make_app(dirs, "--request-timeout", "0.3"))  # no lifespan: the engine never runs
    for body in (BODY, {**BODY, "stream": True}):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error"
    r = client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 408


def test_full_queue_is_429(dirs):
    client = TestClient(make_app(dirs, "--max-queue", "0"))
    r = client.post("/v1/completions", json=BODY)
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"


@pytest.mark.parametrize("argv,message", [
    (["--base", "/does/not/exist"], "does not exist"),
    (["--adapter", "no-equals-sign"], "expected NAME=DIR"),
    (["--adapter", "x=/does/not/exist"], "no adapter_config.json"),
])
def test_cli_errors_are_one_line_and_exit_2(dirs, capsys, argv, message):
    if argv[0] != "--base":
        argv = ["--base", str(dirs["base"]), *argv]
    assert run_command("serve", argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
