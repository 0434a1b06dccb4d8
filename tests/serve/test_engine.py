"""The continuous-batching engine in process: batched == single, padding, joining, LRU, cancel."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from serve_helpers import make_tokenizer, shared_model_dirs_one_thread, submit_all
from transformers import AutoModelForCausalLM, DynamicCache

import lorakit
from lorakit.serve.engine import BatchCache, Engine, GenerationRequest, load_base_model
from lorakit.serve.engine.host import forward
from lorakit.serve.generation import SamplingParams
from lorakit.serve.loading import load_served_adapter
from lorakit.serve.registry import AdapterRegistry

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def dirs():
    yield from shared_model_dirs_one_thread()


def make_engine(dirs, max_loaded: int = 8, max_batch: int = 8) -> Engine:
    model = lorakit.LoraModel(load_base_model(dirs["base"]))
    registry = AdapterRegistry(model, "base", max_loaded=max_loaded, root=dirs["root"])
    for name in "abc":
        registry.add(name, dirs[name], load=False)
    return Engine(model, registry, make_tokenizer(), max_batch=max_batch)


@pytest.fixture(scope="module")
def engine(dirs):
    eng = make_engine(dirs)
    eng.start()
    yield eng
    eng.stop()


def run(engine: Engine, jobs, timeout: float = 60.0, start: bool = False) -> list[tuple[str, str, int]]:
    """Submit all jobs at once; (text, finish_reason, completion_tokens) per job."""
    return [("".join(e.text for e in evs), evs[-1].finish_reason, evs[-1].completion_tokens)
            for evs in submit_all(engine, jobs, timeout, start=start)]


def random_jobs(n: int, seed: int, temperature: float = 0.0):
    rng = random.Random(seed)
    adapters = [None, "a", "b", "c"]
    return [([rng.randrange(7, 120) for _ in range(rng.randint(1, 24))], adapters[i % 4],
             SamplingParams(max_tokens=rng.randint(3, 24), temperature=temperature, seed=i, ignore_eos=i % 3 == 0))
            for i in range(n)]


def test_mixed_adapter_batch_equals_each_request_alone(engine):
    jobs = random_jobs(12, seed=0)
    alone = [run(engine, [job])[0] for job in jobs]
    before = engine.stats.max_adapters
    together = run(engine, jobs)
    assert together == alone
    assert engine.stats.max_rows == 8 and engine.stats.max_adapters == 4 >= before
    assert {r[1] for r in alone} <= {"stop", "length"}


def test_batched_prefill_of_mixed_lengths_and_adapters_equals_each_request_alone(engine, dirs):
    """Requests waiting together are prefilled in one left-padded forward; greedy tokens don't change."""
    rng = random.Random(5)
    lengths = [1, 17, 4, 30, 9, 2, 23, 12]  # very different paddings in one forward
    adapters = [None, "a", "b", "c", "a", None, "c", "b"]
    jobs = [([rng.randrange(7, 120) for _ in range(n)], adapter,
             SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2 if i == 3 else None))
            for i, (n, adapter) in enumerate(zip(lengths, adapters))]
    alone = [run(engine, [job])[0] for job in jobs]  # each prefilled alone (batch 1, unpadded)
    fresh = make_engine(dirs)
    try:
        together = run(fresh, jobs, start=True)  # queued before the worker starts: admitted together
        assert fresh.stats.prefill_batches == 1 and fresh.stats.max_prefill_rows == 8
        assert fresh.stats.prompt_tokens == sum(lengths)
    finally:
        fresh.stop()
    assert together == alone


def test_seeded_sampling_is_the_same_batched_or_alone(engine):
    jobs = random_jobs(8, seed=1, temperature=0.9)
    assert run(engine, jobs) == [run(engine, [job])[0] for job in jobs]


def test_greedy_matches_transformers_generate(engine, dirs):
    base = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32)
    model = lorakit.LoraModel.from_pretrained(base, dirs["b"], adapter_name="b")
    ids = [9, 30, 31, 44, 12]
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=1)
    want = make_tokenizer().decode(out[0, len(ids):], skip_special_tokens=True)
    got = run(engine, [(ids, "b", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))])[0]
    assert got == (want, "length", 12)


def test_left_padding_changes_logits_by_rounding_only(dirs):
    """A decode step for a short row padded to a long row's width equals its unpadded step."""
    model = lorakit.LoraModel(load_base_model(dirs["base"]))
    load_served_adapter(model, "a", dirs["a"])
    rows = [([5, 9, 40], "a"), ([7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], None)]
    batch, alone = BatchCache(), []
    for ids, adapter in rows:
        cache = DynamicCache(config=model.config)
        forward(model, torch.tensor([ids]), [adapter], kv_cache=cache)
        batch.join(cache, len(ids))
        solo = DynamicCache(config=model.config)
        forward(model, torch.tensor([ids]), [adapter], kv_cache=solo)
        alone.append(forward(model, torch.tensor([[20]]), [adapter], kv_cache=solo,
                             position_ids=torch.tensor([[len(ids)]]))[0, -1])
    mask, positions = batch.step_inputs()
    assert mask.tolist()[0] == [0] * 8 + [1] * 4 and positions.flatten().tolist() == [3, 11]
    step = forward(model, torch.tensor([[20], [20]]), ["a", None], kv_cache=batch.cache, attention_mask=mask,
                   position_ids=positions)[:, -1]
    for i in range(2):
        assert (step[i] - alone[i]).abs().max().item() < 1e-5
        assert int(step[i].argmax()) == int(alone[i].argmax())


def test_rows_join_while_others_run(engine):
    long_job = ([10, 11, 12], "a", SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    short_jobs = random_jobs(4, seed=3)
    alone = [run(engine, [j])[0] for j in [long_job, *short_jobs]]
    results: list = []
    t = threading.Thread(target=lambda: results.extend(run(engine, [long_job])))
    steps = engine.stats.steps
    t.start()
    while engine.stats.steps < steps + 5:  # the long row is decoding; now the others arrive
        threading.Event().wait(0.005)
    joined = run(engine, short_jobs)
    t.join(60)
    assert [results[0], *joined] == alone


def test_cancelled_request_leaves_the_batch(engine):
    events = []
    request = GenerationRequest([5, 6, 7], SamplingParams(max_tokens=120, temperature=0, ignore_eos=True),
                                events.append, adapter="a")
    engine.submit(request)
    while not events:
        threading.Event().wait(0.005)
    request.cancel()
    assert run(engine, random_jobs(2, seed=4))  # the engine goes on; the cancelled row is gone
    assert not events[-1].final and len(events) < 120


def test_lru_eviction_keeps_running_adapters_and_reloads_transparently(dirs):
    engine = make_engine(dirs, max_loaded=2, max_batch=4)
    engine.start()
    try:
        jobs = [([5, 9, 12], name, SamplingParams(max_tokens=6, temperature=0)) for name in "abc"]
        first = [run(engine, [j])[0] for j in jobs]
        assert engine.registry.loaded == ["b", "c"] and engine.registry.loads == 3
        assert run(engine, [jobs[0]])[0] == first[0]  # "a" was evicted and comes back
        assert engine.registry.loaded == ["c", "a"] and engine.registry.loads == 4
        assert run(engine, jobs) == first  # 3 adapters, 2 slots: the third waits for a free slot
        assert len(engine.model.peft_config) <= 2
    finally:
        engine.stop()


def test_mixture_with_one_term_equals_the_adapter(engine):
    key = engine.registry.resolve("mix:a=1.0")
    ids = [5, 20, 30, 40]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    assert run(engine, [(ids, key, params)]) == run(engine, [(ids, "a", params)])
    half = engine.registry.resolve("mix:a=0.5,b=0.5")
    assert run(engine, [(ids, half, params)])[0][0]  # builds and generates
