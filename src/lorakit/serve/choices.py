"""A response's choices as their engine events arrive: text, finish reason and logprobs, for the
non-streaming body (``take`` then ``result``) and the stream's chunks (``prefix`` / ``delta``)."""

from __future__ import annotations

from lorakit.serve.engine import GenerationEvent
from lorakit.serve.logprobs import ChatLogprobs, CompletionLogprobs, merge


class CompletionChoice:
    """One completions choice as its events arrive: the echoed prompt first, then the deltas."""

    def __init__(self, tokenizer, ids: list[int], prompt_text: str, echo: bool, logprobs: int | None):
        self.ids, self.echo_text = ids, prompt_text if echo else None
        # echo: offsets count from the prompt's start; else the completion starts at 0 after the prompt
        self.lp = None if logprobs is None else CompletionLogprobs(tokenizer, () if echo else ids)
        self.text, self.parts, self.finish = "", [], None

    def prefix(self, ev: GenerationEvent) -> tuple[str, dict | None] | None:
        """The echoed prompt (text, logprobs) before this choice's first event; None without echo / after."""
        if self.echo_text is None:
            return None
        text, self.echo_text = self.echo_text, None
        logprobs = None
        if self.lp is not None:
            logprobs = self.lp.add(ev.prompt_logprobs or [None] * len(self.ids), ids=self.ids)
            self.lp.skip_to(len(text))
        return text, logprobs

    def delta(self, ev: GenerationEvent) -> dict | None:
        return None if self.lp is None else self.lp.add(ev.logprobs)

    def take(self, ev: GenerationEvent) -> None:
        for text, logprobs in filter(None, [self.prefix(ev), (ev.text, self.delta(ev))]):
            self.text += text
            self.parts.append(logprobs)
        if ev.final:
            self.finish = ev.finish_reason

    def result(self, index: int) -> dict:
        logprobs = None if self.lp is None else merge([p for p in self.parts if p is not None])
        return {"index": index, "text": self.text, "finish_reason": self.finish, "logprobs": logprobs}


class ChatChoice:
    """One chat choice as its events arrive."""

    def __init__(self, tokenizer, ids: list[int], top: int | None):
        self.lp = None if top is None else ChatLogprobs(tokenizer, ids, top)
        self.text, self.content, self.finish = "", [], None

    def delta(self, ev: GenerationEvent) -> list[dict] | None:
        return None if self.lp is None else self.lp.add(ev.logprobs)

    def take(self, ev: GenerationEvent) -> None:
        self.text += ev.text
        self.content += self.delta(ev) or []
        if ev.final:
            self.finish = ev.finish_reason

    def result(self, index: int) -> dict:
        return {"index": index, "text": self.text, "finish_reason": self.finish,
                "logprobs": None if self.lp is None else self.content}
