"""What a request hands the engine and what the engine hands back: requests, events, counters."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from lorakit.serve.errors import ServeError
from lorakit.serve.generation import SamplingParams, TokenLogprob


@dataclass
class GenerationEvent:
    """What the worker tells a request: new text, and at the end why it stopped (or an error)."""

    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS / stop string) | "length" | "cancelled"
    error: ServeError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # the tokens generated since the previous event (those whose text this event carries or held back)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the request's first event, when asked for

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[GenerationEvent], None]  # called on the worker thread; must not block
    adapter: str | None = None  # registry key; None = the base model
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancelled: bool = False  # set by the HTTP side (timeout, client gone); the worker drops the row

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class EngineStats:
    prefills: int = 0  # requests prefilled
    prefill_batches: int = 0  # prefill forwards (requests waiting together share one)
    max_prefill_rows: int = 0  # most requests in one prefill forward
    steps: int = 0
    decode_tokens: int = 0
    max_rows: int = 0  # largest batch a decode step ran
    max_adapters: int = 0  # most distinct adapters (incl. base) in one decode step
    failures: int = 0
    prompt_tokens: int = 0  # tokens prefilled
    generated_tokens: int = 0  # tokens sampled (first tokens from prefills included)
