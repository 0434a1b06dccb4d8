"""Logprobs equal the model's own log_softmax: the engine's numbers (prompt and generated tokens,
greedy and sampled, rows batched with other adapters) against PEFT's forward on the same adapter
and token ids; and the API's token strings / shapes built from them."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import make_tokenizer, shared_model_dirs_one_thread, submit_all
from tolerance import EPS32, fp32_atol

from lorakit.core.model import LoraModel
from lorakit.serve.engine import Engine, load_base_model
from lorakit.serve.generation import SamplingParams, TokenLogprob, token_logprobs
from lorakit.serve.logprobs import ChatLogprobs, CompletionLogprobs
from lorakit.serve.registry import AdapterRegistry

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
# engine (KV cache, left padding, mixed-adapter batch) vs PEFT's one full forward: fp32 rounding of
# up to 9 chained GEMMs with reductions <= 128 (tiny Llama); log_softmax moves by at most 2·max|Δlogit|
ROUNDING = dict(reduction=128, depth=9)


@pytest.fixture(scope="module")
def dirs():
    yield from shared_model_dirs_one_thread()


@pytest.fixture(scope="module")
def engine(dirs):
    model = LoraModel(load_base_model(dirs["base"]))
    registry = AdapterRegistry(model, "base", max_loaded=4, root=dirs["root"])
    for name in "abc":
        registry.add(name, dirs[name], load=False)
    eng = Engine(model, registry, make_tokenizer(), max_batch=8)
    eng.start()
    yield eng
    eng.stop()


def peft_log_softmax(dirs, adapter: str, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax, logits) of PEFT's forward on `ids` with `adapter`: (L, V) each."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(dirs[adapter])).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # (L, V)
    return torch.log_softmax(logits, dim=-1), logits


def run_all(engine: Engine, jobs) -> list[list]:
    """Submit every (ids, adapter, params) at once; each job's events."""
    return submit_all(engine, jobs)


def assert_scores_match(entries: list[TokenLogprob], tokens: list[int], want: torch.Tensor, logits: torch.Tensor,
                        k: int) -> None:
    """entries[i] scores tokens[i] under the distribution want[i] (PEFT's log_softmax rows)."""
    tol = 2 * fp32_atol(logits, **ROUNDING) + 8 * EPS32 * float(want.abs().max())
    assert [e.token_id for e in entries] == tokens
    for entry, row in zip(entries, want):
        assert abs(entry.logprob - float(row[entry.token_id])) <= tol
        assert len(entry.top) == k
        kth = float(row.topk(k).values[-1]) if k else float("-inf")
        for token, lp in entry.top:  # each alternative scored right, and none below PEFT's k-th best
            assert abs(lp - float(row[token])) <= tol and lp >= kth - tol
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_prompt_and_generated_logprobs_equal_peft_log_softmax(engine, dirs, temperature):
    prompt = [5, 9, 12, 40, 41, 7, 60, 33]
    k = 5
    params = SamplingParams(max_tokens=10, temperature=temperature, top_p=0.9, seed=11, ignore_eos=True,
                            logprobs=k, prompt_logprobs=k)
    # other adapters' rows share the batch: the scored row goes through the mixed, padded decode path
    others = [([8, 9, 10, 11, 12][:n], name, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
              for n, name in ((2, "b"), (5, None), (3, "c"))]
    events = run_all(engine, [(prompt, "a", params)] + others)[0]
    first = events[0].prompt_logprobs
    assert first is not None and first[0] is None and len(first) == len(prompt)
    assert all(ev.prompt_logprobs is None for ev in events[1:])  # sent once
    generated = [e for ev in events for e in ev.logprobs]
    tokens = [e.token_id for e in generated]
    assert len(tokens) == events[-1].completion_tokens == 10
    want, logits = peft_log_softmax(dirs, "a", prompt + tokens[:-1])
    assert_scores_match(first[1:], prompt[1:], want[:len(prompt) - 1], logits, k)
    assert_scores_match(generated, tokens, want[len(prompt) - 1:], logits, k)
    if temperature == 0:  # greedy: the chosen token is the most likely one
        assert all(e.top[0][0] == e.token_id for e in generated)


def test_scoring_only_request_generates_nothing(engine, dirs):
    prompt = [2, 30, 31, 32, 33, 34]
    (ev,) = run_all(engine, [(prompt, "b", SamplingParams(max_tokens=0, prompt_logprobs=1))])[0]
    assert ev.finish_reason == "length" and ev.completion_tokens == 0 and ev.text == "" and not ev.logprobs
    want, logits = peft_log_softmax(dirs, "b", prompt)
    assert_scores_match(ev.prompt_logprobs[1:], prompt[1:], want[:-1], logits, 1)


def test_rows_without_logprobs_get_none():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    out = token_logprobs(logits, [1, 2, 3], [None, 0, 2])
    assert out[0] is None and out[1].top == [] and len(out[2].top) == 2
    assert out[2].logprob == pytest.approx(float(torch.log_softmax(logits[2], -1)[3]), abs=1e-6)


def test_token_strings_concatenate_to_the_text_and_offsets_follow_it():
    tok = make_tokenizer()
    ids = tok("hello world the red cat")["input_ids"]
    entries = [TokenLogprob(t, -1.0, [(t, -1.0), (8, -2.0)]) for t in ids[1:]]
    out = CompletionLogprobs(tok).add([None] + entries, ids=ids)
    assert "".join(out["tokens"]) == "hello world the red cat"
    assert out["text_offset"] == [0, 5, 11, 15, 19]
    assert out["token_logprobs"][0] is None and out["top_logprobs"][0] is None
    assert out["top_logprobs"][1] == {" world": -1.0, " " + tok.convert_ids_to_tokens(8): -2.0}
    chat = ChatLogprobs(tok, ids[:2], top=1).add(entries[1:2])
    assert chat == [{"token": " the", "logprob": -1.0, "bytes": list(b" the"),
                     "top_logprobs": [{"token": " the", "logprob": -1.0, "bytes": list(b" the")}]}]
