"""The OpenAI API beyond plain generation, through the app: echo + logprobs (prompt scoring, as
lm-eval's local-completions sends it) equal to PEFT's log_softmax, streamed logprobs equal to the
non-streamed ones, n > 1 with seeds, chat logprobs, stop strings across token boundaries in a
stream, and, on a real server process, a non-streaming request cancelled when its client leaves."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
import torch
from serve_helpers import ServerProcess, make_tokenizer, save_base, shared_model_dirs
from test_app import make_app
from test_logprobs import ROUNDING, peft_log_softmax
from tolerance import EPS32, fp32_atol

from lorakit.serve.generation import choice_seed

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    threads = torch.get_num_threads()
    with TestClient(make_app(shared_model_dirs())) as c:
        yield c
    torch.set_num_threads(threads)


def post(client, path: str = "/v1/completions", **body) -> dict:
    r = client.post(path, json={"model": "a", **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream(client, path: str = "/v1/completions", **body) -> list[dict]:
    with client.stream("POST", path, json={"model": "a", "stream": True, **body}) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_echo_scores_the_prompt_like_peft(client):
    ids = [2, 30, 31, 12, 40, 41, 7, 60]  # token ids, as lm-eval sends them
    body = post(client, prompt=ids, max_tokens=0, echo=True, logprobs=3)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == make_tokenizer().decode(ids, skip_special_tokens=True)
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 0, "total_tokens": 8}
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want, logits = peft_log_softmax(shared_model_dirs(), "a", ids)
    expected = want[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)  # (L-1,)
    tol = 2 * fp32_atol(logits, **ROUNDING) + 8 * EPS32 * float(want.abs().max())
    assert (torch.tensor(lp["token_logprobs"][1:]) - expected).abs().max() <= tol
    for top, chosen in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]):
        assert 3 <= len(top) <= 4 and chosen in top.values()  # the k best plus the chosen token


def test_lm_eval_request_shape_one_generated_token(client):
    # local-completions: echo + logprobs=1 + max_tokens=1; it reads token_logprobs[ctxlen:-1]
    ids = [2, 30, 31, 12, 40]
    lp = post(client, prompt=[ids, ids[:3]], max_tokens=1, echo=True, logprobs=1, temperature=0)
    for choice, n in zip(lp["choices"], (5, 3)):
        got = choice["logprobs"]
        assert len(got["token_logprobs"]) == n + 1 and all(len(t) >= 1 for t in got["top_logprobs"][1:])
        greedy = got["top_logprobs"][-1]
        assert got["token_logprobs"][-1] == max(greedy.values())  # temperature 0: the argmax was generated
        assert got["text_offset"] == sorted(got["text_offset"])


def test_streamed_logprobs_equal_non_streamed(client):
    kw = dict(prompt="hello world the cat", max_tokens=8, temperature=0, logprobs=2, echo=True)
    full = post(client, **kw)["choices"][0]
    chunks = stream(client, **kw)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks if c["choices"][0]["logprobs"] for x in c["choices"][0]["logprobs"][key]] \
            == full["logprobs"][key]


def test_n_choices_are_seeded_per_choice_and_reproducible(client):
    kw = dict(prompt="hello world", max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    many = post(client, n=3, **kw)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in many["choices"]]
    assert texts == [c["text"] for c in post(client, n=3, **kw)["choices"]]  # reproducible
    for j, text in enumerate(texts):  # choice j is the n=1 request with the derived seed
        assert post(client, **{**kw, "seed": choice_seed(7, j)})["choices"][0]["text"] == text
    assert len(set(texts)) > 1 and many["usage"]["completion_tokens"] == 24
    two_prompts = post(client, n=2, **{**kw, "prompt": ["hello world", "the cat"]})
    assert [c["text"] for c in two_prompts["choices"]][:2] == texts[:2]  # index = prompt · n + j
    streamed = stream(client, n=3, **kw)
    assert ["".join(c["choices"][0]["text"] for c in streamed if c["choices"][0]["index"] == j)
            for j in range(3)] == texts


def test_chat_logprobs_and_n(client):
    messages = [{"role": "user", "content": "hello"}]
    body = post(client, "/v1/chat/completions", messages=messages, max_tokens=5, temperature=0, logprobs=True,
                top_logprobs=3, n=2, ignore_eos=True)
    assert len(body["choices"]) == 2
    for choice in body["choices"]:
        content = choice["logprobs"]["content"]
        assert len(content) == 5
        for entry in content:
            assert entry["bytes"] == list(entry["token"].encode()) and len(entry["top_logprobs"]) == 3
            assert entry["logprob"] == entry["top_logprobs"][0]["logprob"]  # greedy: the best one
        assert "".join(e["token"] for e in content).strip() == choice["message"]["content"].strip()
    plain = post(client, "/v1/chat/completions", messages=messages, max_tokens=5, temperature=0)
    assert plain["choices"][0]["logprobs"] is None
    chunks = stream(client, "/v1/chat/completions", messages=messages, max_tokens=5, temperature=0, logprobs=True,
                    ignore_eos=True)
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert [(e["token"], e["top_logprobs"]) for e in streamed] == \
        [(e["token"], []) for e in body["choices"][0]["logprobs"]["content"]]


def test_stop_string_across_token_boundaries_never_reaches_the_stream(client):
    full = post(client, prompt="hello world", max_tokens=16, temperature=0, ignore_eos=True)["choices"][0]["text"]
    words = full.split()
    assert len(words) >= 4
    stop = f"{words[1]} {words[2]}"  # two tokens: the first is held back until the second decides
    cut = full[:full.index(stop)]
    chunks = stream(client, prompt="hello world", max_tokens=16, temperature=0, ignore_eos=True, stop=stop)
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == cut and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    body = post(client, prompt="hello world", max_tokens=16, temperature=0, ignore_eos=True, stop=stop)
    assert body["choices"][0]["text"] == cut


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, 422, "logprobs"),
    ({"prompt": "x", "logprobs": True}, 422, "logprobs"),
    ({"prompt": "x", "n": 17}, 400, "n"),
    ({"prompt": ["x", "y"], "n": 9}, 400, "n"),
    ({"prompt": "x", "n": 2, "best_of": 3}, 400, "best_of"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, 422, "top_logprobs"),
])
def test_bad_logprobs_and_n_are_refused(client, body, status, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = client.post(path, json={"model": "a", **body})
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


# ------------------------------------------------------------------ a real server process
@pytest.mark.slow
def test_non_streaming_request_is_cancelled_when_the_client_disconnects(tmp_path):
    base = save_base(tmp_path / "long", max_position_embeddings=4096)
    srv = ServerProcess(["--base", str(base), "--served-model-name", "base", "--max-tokens-cap", "4000",
                         "--request-timeout", "600"])
    try:
        def decoded() -> int:
            return httpx.get(srv.url + "/v1/stats", timeout=10).json()["engine"]["decode_tokens"]

        body = json.dumps({"model": "base", "prompt": "hello world", "max_tokens": 4000, "temperature": 0,
                           "ignore_eos": True}).encode()
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 60
        while decoded() < 20:  # generating
            assert time.monotonic() < deadline, "generation never started"
            time.sleep(0.05)
        sock.close()  # the client leaves without reading the answer
        last, stable_since = decoded(), time.monotonic()
        while time.monotonic() - stable_since < 1.0:  # until decoding stops for a second
            time.sleep(0.1)
            now = decoded()
            if now != last:
                last, stable_since = now, time.monotonic()
        assert last < 2000, f"the engine decoded {last} of 4000 tokens after the client left"
        r = httpx.post(srv.url + "/v1/completions", json={"model": "base", "prompt": "hello", "max_tokens": 3},
                       timeout=60)
        assert r.status_code == 200 and srv.alive()
    finally:
        srv.close()
