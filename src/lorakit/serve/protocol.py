"""OpenAI request bodies (pydantic) and the response / stream-chunk shapes the API returns.

Field names and defaults follow OpenAI's API reference; fields we accept but don't implement
(penalties, logit_bias, suffix, tools, best_of > n) are refused with a 400 that names them, never
silently ignored. Unknown extra fields are ignored, as OpenAI clients send new ones over time.
``ignore_eos`` is an extension (vLLM's name) used by the benchmarks.

Logprobs follow vLLM's shapes: completions ``{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}`` (see :mod:`lorakit.serve.logprobs`), chat ``{"content": [{"token", "logprob",
"bytes", "top_logprobs"}]}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from lorakit.serve.errors import BadRequest
from lorakit.serve.generation import MAX_LOGPROBS

# strict: true / "4" are type errors (422), not 1 / 4 — a client sending them has a bug to hear about
Number = StrictFloat | StrictInt


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number = Field(default=1.0, ge=0, le=2)
    top_p: Number = Field(default=1.0, gt=0, le=1)
    n: StrictInt = Field(default=1, ge=1)  # choices per prompt (the server bounds n × prompts)
    stream: StrictBool = False  # "yes" / 1 are refused, not read as true
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    stream_options: dict[str, Any] | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    ignore_eos: StrictBool = False

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise BadRequest("stop must be a non-empty string or a list of at most 4 non-empty strings", param="stop")
        return stop

    def check_supported(self) -> None:
        if self.presence_penalty or self.frequency_penalty:
            param = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise BadRequest(f"{param} is not supported (use 0)", param=param)
        if self.logit_bias:
            raise BadRequest("logit_bias is not supported", param="logit_bias")

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=0)  # 0 only with echo: score the prompt
    echo: StrictBool = False  # return the prompt before the completion (and its logprobs, if asked)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # top-k per token (+ the chosen)
    best_of: StrictInt | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise BadRequest("suffix is not supported", param="suffix")
        if self.best_of not in (None, self.n):  # best_of = n is plain n: nothing to rank
            raise BadRequest(f"best_of is not supported (leave it unset or equal to n={self.n})", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise BadRequest("max_tokens=0 generates nothing; use it with echo=true to score the prompt",
                             param="max_tokens")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictBool | None = None  # the chosen tokens' logprobs in choices[i].logprobs.content
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # and the k most likely
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs=true", param="top_logprobs")
        if self.tools:
            raise BadRequest("tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise BadRequest("only response_format type 'text' is supported", param="response_format")


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
    load: StrictBool = True  # False: register only; loaded on first use


# ---------------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """choices: ``{"index", "text", "finish_reason", "logprobs"}`` each (logprobs None when not asked)."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "logprobs": c.get("logprobs"),
                         "finish_reason": c["finish_reason"]} for c in choices],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
            "system_fingerprint": None}


def chat_completion(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """choices: ``{"index", "text", "finish_reason", "logprobs"}`` each (logprobs: the content list or None)."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"], "refusal": None},
                         "logprobs": None if c.get("logprobs") is None else {"content": c["logprobs"]},
                         "finish_reason": c["finish_reason"]} for c in choices],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None, index: int = 0,
               logprobs: list[dict] | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta,
                         "logprobs": None if logprobs is None else {"content": logprobs},
                         "finish_reason": finish_reason}],
            "system_fingerprint": None}


def usage_chunk(rid: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def model_card(name: str, created: int, parent: str | None = None, **extra: Any) -> dict:
    card = {"id": name, "object": "model", "created": created, "owned_by": "lorakit"}
    if parent is not None:
        card["parent"] = parent
    card.update(extra)
    return card
