"""Sampling and incremental detokenisation with stop strings."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import make_tokenizer

from lorakit.serve.generation import SamplingError, SamplingParams, TextStream, choice_seed, sample_rows


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _push_all(stream: TextStream, ids: list[int]) -> tuple[str, bool]:
    out = ""
    for t in ids:
        delta, stopped = stream.push(t)
        out += delta
        if stopped:
            return out, True
    return out + stream.flush(), False


def test_text_stream_without_stop_gives_the_decoded_text(tok):
    ids = tok("the red cat is on the tree")["input_ids"]
    assert _push_all(TextStream(tok), ids) == ("the red cat is on the tree", False)


def test_stop_string_is_cut_and_never_emitted(tok):
    ids = tok("the red cat is on the tree")["input_ids"]
    stream = TextStream(tok, stop=["is on"])
    deltas = []
    for t in ids:
        delta, stopped = stream.push(t)
        deltas.append(delta)
        if stopped:
            break
    assert stopped and "".join(deltas) == "the red cat "
    # "is" alone could start "is on": it was held back, not emitted and then retracted
    assert all("is" not in d for d in deltas)


def test_held_back_prefix_is_released_when_it_does_not_complete(tok):
    ids = tok("the cat is big")["input_ids"]
    assert _push_all(TextStream(tok, stop=["is on"]), ids) == ("the cat is big", False)


def test_greedy_rows_take_argmax_and_seeded_rows_repeat():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=7),
              SamplingParams(temperature=0.7, top_p=0.5, seed=8)]
    first = sample_rows(logits, params, [p.make_generator() for p in params])
    again = sample_rows(logits, params, [p.make_generator() for p in params])
    assert first == again and first[0] == int(logits[0].argmax())


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[5.0, 4.0, -5.0, -5.0, -5.0]])
    p = SamplingParams(temperature=1.0, top_p=0.5, seed=0)
    gen = p.make_generator()
    assert {sample_rows(logits, [p], [gen])[0] for _ in range(50)} == {0}  # token 0 alone holds > 0.5


@pytest.mark.parametrize("kwargs", [dict(max_tokens=-1), dict(temperature=-1), dict(temperature=3),
                                    dict(top_p=0), dict(top_p=1.5), dict(stop=[""]), dict(logprobs=21),
                                    dict(logprobs=True), dict(prompt_logprobs=-1)])
def test_bad_sampling_params_raise(kwargs):
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)


def test_choice_seeds_keep_choice_zero_and_differ_per_choice():
    assert choice_seed(None, 3) is None and choice_seed(7, 0) == 7
    seeds = [choice_seed(7, j) for j in range(1, 50)]
    assert len(set(seeds)) == 49 and seeds == [choice_seed(7, j) for j in range(1, 50)]
    assert choice_seed(8, 1) not in seeds
