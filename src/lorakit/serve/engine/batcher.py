"""Continuous batching: one worker thread owns the model and runs every request through it.

Scheduling (one loop iteration):

1. run admin commands (adapter load / unload) queued by the HTTP side, between steps;
2. admit waiting requests while the batch has room: make sure each request's adapter is in memory
   (the registry may evict an unused one), then prefill all of them in ONE forward (left-padded to
   the longest prompt, an attention mask and per-row position ids, one adapter per row, logits for
   the last position only) and sample their first tokens; their KV caches join the batch cache
   (:class:`BatchCache`), one batched forward being much cheaper than one forward per prompt;
3. one decode step over ALL running rows: a single forward with ``adapter_names=[...]`` (one
   adapter or None per row — the core's mixed-batch path, no loop over rows or adapters), the
   batch KV cache, a 2-D attention mask hiding each row's left padding and per-row position ids;
4. rows that hit EOS, a stop string, their token budget or a cancellation leave the batch at once;
   waiting requests take their place in the next iteration.

A request that asks for logprobs gets, with each event, the chosen tokens' ``log_softmax`` of the
step's raw logits and their top-k (:func:`~lorakit.serve.generation.token_logprobs`); one that asks
for prompt logprobs (echo) is prefilled alone, with logits for every position instead of the last only,
and ``max_tokens=0`` stops right after that prefill (prompt scoring).

Each row samples with its own ``torch.Generator`` (seeded per request), so a seeded request gives
the same tokens however it is batched. Failures are confined: a request whose adapter fails to
load gets an error event; a forward that raises fails the rows in that step; sampling or
detokenising that raises for one row fails that row's request alone; anything else that escapes
an iteration fails the running rows and the loop goes on. The worker never dies on an exception
(only on shutdown), and :attr:`Engine.alive` tells ``/health`` if it did anyway.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from lorakit.core.model import LoraModel
from lorakit.serve.engine.host import forward
from lorakit.serve.engine.kv import BatchCache, left_padded
from lorakit.serve.engine.requests import EngineStats, GenerationEvent, GenerationRequest
from lorakit.serve.errors import EngineError, Overloaded, ServeError
from lorakit.serve.generation import (
    TextStream,
    TokenLogprob,
    prompt_logprobs,
    sample_rows,
    token_logprobs,
)
from lorakit.serve.registry import AdapterRegistry

logger = logging.getLogger(__name__)


@dataclass
class _Row:
    request: GenerationRequest
    generator: torch.Generator
    stream: TextStream
    limit: int  # max new tokens: the request's max_tokens, cut to what the context window allows
    last_token: int = -1
    generated: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent with an event
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent with the first event


class Engine:
    def __init__(self, model: LoraModel, registry: AdapterRegistry, tokenizer, max_batch: int = 8,
                 max_queue: int = 256, max_context: int | None = None):
        self.model, self.registry, self.tokenizer = model, registry, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        config = model.config
        self.max_context = max_context or getattr(config, "max_position_embeddings", None) or 2048
        self.eos_ids = _eos_ids(model.model, tokenizer)
        self.stats = EngineStats()
        self._pending: collections.deque[GenerationRequest] = collections.deque()
        self._commands: collections.deque[tuple[Callable[[], object], Future]] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._rows: list[_Row] = []
        self._admitting: list[GenerationRequest] = []  # admitted this iteration, being prefilled
        self._cache = BatchCache()
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The worker thread is running (``/health`` reports 503 otherwise)."""
        return self._thread.is_alive() and not self._closed

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> None:
        with self._cv:
            if self._closed:
                raise Overloaded("the server is shutting down", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                raise Overloaded(f"too many waiting requests ({self.max_queue}); retry later")
            self._pending.append(request)
            self._cv.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the worker thread between two steps (adapter loads, unloads)."""
        future: Future = Future()
        with self._cv:
            if self._closed:
                future.set_exception(Overloaded("the server is shutting down", code="shutting_down"))
                return future
            self._commands.append((fn, future))
            self._cv.notify()
        return future

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch row (metrics)."""
        return len(self._pending)

    @property
    def running_rows(self) -> int:
        """Rows in the running batch (metrics)."""
        return len(self._rows)

    def pinned(self) -> frozenset[str]:
        """Adapters the running rows and the requests being prefilled use (worker thread): they stay in memory."""
        return frozenset(r.request.adapter for r in self._rows if r.request.adapter is not None) | _adapters(
            self._admitting)

    # ------------------------------------------------------------------ worker thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._pending or self._commands or self._rows):
                    self._cv.wait()
                if self._closed:
                    break
                commands, self._commands = list(self._commands), collections.deque()
            for fn, future in commands:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as exc:  # handed to the caller, who renders it
                        future.set_exception(exc)
            try:
                self._admit()
                if self._rows:
                    self._step()
            except Exception as exc:  # a bug: fail what is running, keep serving
                logger.exception("engine iteration failed; failing its %d running rows", len(self._rows))
                self.stats.failures += 1
                for row in self._rows:
                    _emit(row.request, GenerationEvent(error=EngineError(f"generation failed: {exc}")))
                self._rows, self._cache = [], BatchCache()
                self.registry.collect(self.pinned())
        self._shutdown()

    def _admit(self) -> None:
        admitted: list[GenerationRequest] = []
        blocked = []
        while len(self._rows) + len(admitted) < self.max_batch:
            with self._cv:
                if not self._pending:
                    break
                request = self._pending.popleft()
            if request.cancelled:
                continue
            try:
                # the adapters of requests admitted but not yet prefilled must stay loaded too
                if not self.registry.ensure_loaded(request.adapter, self.pinned() | _adapters(admitted)):
                    blocked.append(request)  # every adapter slot is in use: wait for rows to finish
                    continue
            except ServeError as exc:
                _emit(request, GenerationEvent(error=exc))
                continue
            admitted.append(request)
        if blocked:
            with self._cv:
                self._pending.extendleft(reversed(blocked))
        if not admitted:
            return
        # one batched prefill for every plain request; an echo request (logits at every prompt position,
        # B x L x V floats) is prefilled alone, unpadded, so its prompt logprobs are those of a lone run
        plain = [r for r in admitted if r.params.prompt_logprobs is None]
        groups = [[r] for r in admitted if r.params.prompt_logprobs is not None] + ([plain] if plain else [])
        self._admitting = admitted
        try:
            for group in groups:
                self._prefill_guarded(group)
        finally:
            self._admitting = []

    def _prefill_guarded(self, requests: list[GenerationRequest]) -> None:
        """Prefill a group; if its forward raises, each request alone, so only the guilty one fails."""
        try:
            all_logits, cache = self._prefill_forward(requests)
        except Exception as exc:
            if len(requests) > 1:
                logger.warning("batched prefill of %d requests failed (%s); prefilling each alone",
                               len(requests), exc)
                for request in requests:
                    self._prefill_guarded([request])
            else:
                self._fail_prefill(requests, exc)
            return
        try:
            self._start_rows(requests, all_logits, cache)
        except Exception as exc:  # a bug past the forward: these requests fail, the running rows go on
            self._fail_prefill(requests, exc)

    def _fail_prefill(self, requests: list[GenerationRequest], exc: Exception) -> None:
        if not isinstance(exc, ServeError):
            logger.error("prefill failed for %d request(s)", len(requests), exc_info=exc)
            self.stats.failures += 1
            exc = EngineError(f"generation failed: {exc}")
        for request in requests:
            _emit(request, GenerationEvent(error=exc))

    def _prefill_forward(self, requests: list[GenerationRequest]) -> tuple[torch.Tensor, DynamicCache]:
        """One forward over the prompts, left-padded to the longest: logits (k, W or 1, V) and the KV cache."""
        lengths = [len(r.prompt_ids) for r in requests]
        k = len(requests)
        scored = requests[0].params.prompt_logprobs is not None  # echo: alone, logits for every position
        ids, mask, positions = left_padded([r.prompt_ids for r in requests])  # (k, W) each
        # one prompt: no padding, no mask, exactly the unbatched forward
        kwargs = {"attention_mask": mask, "position_ids": positions} if k > 1 else {}
        cache = DynamicCache(config=self.model.config)
        all_logits = forward(self.model, ids, [r.adapter for r in requests], kv_cache=cache,
                             last_only=not scored, **kwargs)
        self.stats.prefills += k
        self.stats.prefill_batches += 1
        self.stats.max_prefill_rows = max(self.stats.max_prefill_rows, k)
        self.stats.prompt_tokens += sum(lengths)
        return all_logits, cache

    def _start_rows(self, requests: list[GenerationRequest], all_logits: torch.Tensor, cache: DynamicCache
                    ) -> None:
        """First tokens from a prefill's logits; the rows that go on join the running batch and its cache."""
        lengths = [len(r.prompt_ids) for r in requests]
        k = len(requests)
        scored = requests[0].params.prompt_logprobs is not None
        logits = all_logits[:, -1].float()  # (k, V): left padding puts every row's last token last
        finite = torch.isfinite(all_logits if scored else logits).flatten(1).all(dim=1).tolist()
        rows = [_Row(r, r.params.make_generator(), TextStream(self.tokenizer, r.params.stop),
                     limit=min(r.params.max_tokens, self.max_context - n)) for r, n in zip(requests, lengths)]
        tokens = self._sample_each(torch.nan_to_num(logits), rows)
        scores = self._logprobs_each(logits, rows, tokens, finite)
        joining = []
        for i, row in enumerate(rows):
            request = row.request
            if not finite[i]:
                _emit(request, GenerationEvent(
                    error=EngineError("the model produced non-finite logits for this prompt (a broken adapter?)")))
                continue
            if scored:
                row.prompt_logprobs = prompt_logprobs(all_logits[0].float(), request.prompt_ids,
                                                      request.params.prompt_logprobs)
            if row.limit == 0:  # scoring only: nothing to generate, the row never joins the batch
                _emit(request, GenerationEvent(finish_reason="length", prompt_tokens=lengths[i],
                                               prompt_logprobs=row.prompt_logprobs))
                continue
            if isinstance(tokens[i], Exception):
                logger.error("sampling failed for request %s", request.request_id, exc_info=tokens[i])
                self.stats.failures += 1
                _emit(request, GenerationEvent(error=EngineError(f"generation failed: {tokens[i]}")))
                continue
            joining.append(i)
        if not joining:
            return
        if len(joining) < k:
            cache.batch_select_indices(torch.tensor(joining, dtype=torch.long))
        first = len(self._rows)
        self._cache.join(cache, [lengths[i] for i in joining])
        self._rows.extend(rows[i] for i in joining)
        keep = list(range(first))
        for j, i in enumerate(joining):
            row = rows[i]
            try:
                if not self._accept(row, tokens[i], scores[i]):
                    keep.append(first + j)
            except Exception as exc:  # this row's request fails; the others go on
                logger.exception("row of request %s failed", row.request.request_id)
                self.stats.failures += 1
                _emit(row.request, GenerationEvent(error=EngineError(f"generation failed: {exc}")))
        if len(keep) < len(self._rows):
            self._keep(keep)

    def _step(self) -> None:
        live = [i for i, r in enumerate(self._rows) if not r.request.cancelled]
        if len(live) < len(self._rows):
            self._keep(live)
            if not self._rows:
                return
        rows = self._rows
        names = [r.request.adapter for r in rows]
        mask, positions = self._cache.step_inputs()
        ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long)  # (B, 1)
        try:
            logits = forward(self.model, ids, names, kv_cache=self._cache.cache, attention_mask=mask,
                             position_ids=positions)[:, -1].float()  # (B, V)
        except Exception as exc:
            logger.exception("decode step failed; failing its %d rows", len(rows))
            self.stats.failures += 1
            for row in rows:
                _emit(row.request, GenerationEvent(error=EngineError(f"generation failed: {exc}")))
            self._keep([])
            return
        self._cache.advance(mask)
        self.stats.steps += 1
        self.stats.decode_tokens += len(rows)
        self.stats.max_rows = max(self.stats.max_rows, len(rows))
        self.stats.max_adapters = max(self.stats.max_adapters, len(set(names)))
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        tokens = self._sample_each(torch.nan_to_num(logits), rows)
        scores = self._logprobs_each(logits, rows, tokens, finite)
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if not finite[i]:
                _emit(row.request, GenerationEvent(error=EngineError("the model produced non-finite logits")))
                continue
            try:
                if isinstance(token, Exception):
                    raise token
                if not self._accept(row, token, scores[i]):
                    keep.append(i)
            except Exception as exc:  # this row's request fails; the others go on
                logger.exception("row of request %s failed", row.request.request_id)
                self.stats.failures += 1
                _emit(row.request, GenerationEvent(error=EngineError(f"generation failed: {exc}")))
        if len(keep) < len(rows):
            self._keep(keep)

    def _sample_each(self, logits: torch.Tensor, rows: list[_Row]) -> list[int | Exception]:
        """Next token per row; a row whose sampling raises gets the exception instead of a token."""
        try:
            return list(sample_rows(logits, [r.request.params for r in rows], [r.generator for r in rows]))
        except Exception:  # find the guilty rows: each alone
            out: list[int | Exception] = []
            for i, row in enumerate(rows):
                try:
                    out.append(sample_rows(logits[i:i + 1], [row.request.params], [row.generator])[0])
                except Exception as exc:
                    out.append(exc)
            return out

    def _logprobs_each(self, logits: torch.Tensor, rows: list[_Row], tokens: list, finite: list[bool]
                       ) -> list[TokenLogprob | None]:
        """The sampled tokens' logprobs for the rows that asked (None for the others and failed rows)."""
        ks = [r.request.params.logprobs if ok and isinstance(t, int) else None
              for r, t, ok in zip(rows, tokens, finite)]
        if all(k is None for k in ks):
            return [None] * len(rows)
        return token_logprobs(logits, [t if isinstance(t, int) else 0 for t in tokens], ks)

    def _accept(self, row: _Row, token: int, score: TokenLogprob | None = None) -> bool:
        """Take one sampled token; emit text; True when the row is finished."""
        row.generated += 1
        row.last_token = token
        if score is not None:
            row.logprobs.append(score)
        self.stats.generated_tokens += 1
        params = row.request.params
        finish = None
        if token in self.eos_ids and not params.ignore_eos:
            delta, finish = row.stream.flush(), "stop"
        else:
            delta, stopped = row.stream.push(token)
            if stopped:
                finish = "stop"
            elif row.generated >= row.limit:
                delta, finish = delta + row.stream.flush(), "length"
        if delta or finish:
            _emit(row.request, GenerationEvent(text=delta, finish_reason=finish,
                                               prompt_tokens=len(row.request.prompt_ids),
                                               completion_tokens=row.generated, logprobs=row.logprobs,
                                               prompt_logprobs=row.prompt_logprobs))
            row.logprobs, row.prompt_logprobs = [], None
        return finish is not None

    def _keep(self, indices: list[int]) -> None:
        self._rows = [self._rows[i] for i in indices]
        self._cache.keep(indices)
        self.registry.collect(self.pinned())

    def _shutdown(self) -> None:
        error = Overloaded("the server is shutting down", code="shutting_down")
        with self._cv:
            waiting, self._pending = list(self._pending), collections.deque()
            commands, self._commands = list(self._commands), collections.deque()
        for request in waiting + [r.request for r in self._rows]:
            _emit(request, GenerationEvent(error=error))
        for _, future in commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        self._rows, self._cache = [], BatchCache()


def _emit(request: GenerationRequest, event: GenerationEvent) -> None:
    try:
        request.on_event(event)
    except Exception:  # a listener that went away must not stop the engine
        logger.debug("event listener for %s failed", request.request_id, exc_info=True)


def _adapters(requests: list[GenerationRequest]) -> frozenset[str]:
    return frozenset(r.adapter for r in requests if r.adapter is not None)


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
