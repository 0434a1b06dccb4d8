"""From the asyncio side to the engine's worker thread and back.

:class:`Generation` submits one engine request per sequence (a prompt, or one of a prompt's n
choices) at construction (so a full queue is a 429 before any response starts) and yields
``(sequence index, event)`` pairs as the worker produces them. The per-request timeout covers the whole generation; when it expires, or the consumer stops
early (client disconnected), every unfinished engine request is cancelled and its batch row freed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from lorakit.serve.engine import Engine, GenerationEvent, GenerationRequest
from lorakit.serve.errors import Timeout
from lorakit.serve.generation import SamplingParams


class Generation:
    def __init__(self, engine: Engine, prompts: list[list[int]], adapter: str | None,
                 params: SamplingParams | list[SamplingParams], timeout: float):
        """params: one for all sequences, or one per sequence (n > 1: each choice its own seed)."""
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, GenerationEvent]] = asyncio.Queue()
        self._timeout = timeout
        self._deadline = self._loop.time() + timeout
        per_row = params if isinstance(params, list) else [params] * len(prompts)
        self.requests = [GenerationRequest(ids, p, self._listener(i), adapter=adapter)
                         for i, (ids, p) in enumerate(zip(prompts, per_row, strict=True))]
        try:
            for request in self.requests:
                engine.submit(request)
        except BaseException:
            self.cancel()
            raise

    def _listener(self, index: int):
        def on_event(event: GenerationEvent) -> None:  # runs on the worker thread
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        return on_event

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def events(self) -> AsyncIterator[tuple[int, GenerationEvent]]:
        """Events until every prompt finished; raises the first error (ServeError) or Timeout."""
        open_rows = set(range(len(self.requests)))
        try:
            while open_rows:
                remaining = self._deadline - self._loop.time()
                try:
                    index, event = await asyncio.wait_for(self._queue.get(), timeout=max(remaining, 0.0))
                except asyncio.TimeoutError:
                    raise Timeout(f"the request did not finish within the server's {self._timeout:g} s limit; "
                                  "ask for fewer max_tokens") from None
                if event.error is not None:
                    raise event.error
                if event.final:
                    open_rows.discard(index)
                yield index, event
        finally:
            self.cancel()  # no-op for finished requests; frees the rows of abandoned ones
