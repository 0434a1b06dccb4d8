"""OpenAI request bodies (pydantic) and the response / stream-chunk shapes the API returns.

Field names and defaults follow OpenAI's API reference; fields we accept but don't implement
(logprobs, echo, penalties, n > 1, ...) are refused with a 400 that names them, never silently
ignored. Unknown extra fields are ignored, as OpenAI clients send new ones over time.
``ignore_eos`` is an extension (vLLM's name) used by the benchmarks.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from lorakit.serve.errors import BadRequest

# strict: true / "4" are type errors (422), not 1 / 4 — a client sending them has a bug to hear about
Number = StrictFloat | StrictInt


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number = Field(default=1.0, ge=0, le=2)
    top_p: Number = Field(default=1.0, gt=0, le=1)
    n: StrictInt = Field(default=1, ge=1)
    stream: StrictBool = False  # "yes" / 1 are refused, not read as true
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    stream_options: dict[str, Any] | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logprobs: Any = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    ignore_eos: StrictBool = False

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise BadRequest("stop must be a non-empty string or a list of at most 4 non-empty strings", param="stop")
        return stop

    def check_supported(self) -> None:
        if self.n != 1:
            raise BadRequest("only n=1 is supported", param="n")
        if self.presence_penalty or self.frequency_penalty:
            param = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise BadRequest(f"{param} is not supported (use 0)", param=param)
        if self.logprobs not in (None, False, 0):
            raise BadRequest("logprobs are not supported", param="logprobs")
        if self.logit_bias:
            raise BadRequest("logit_bias is not supported", param="logit_bias")

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = Field(min_length=1)
    echo: StrictBool = False
    best_of: StrictInt | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("echo", "suffix"):
            if getattr(self, name):
                raise BadRequest(f"{name} is not supported", param=name)
        if self.best_of not in (None, 1):
            raise BadRequest("best_of is not supported", param="best_of")


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
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
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
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "logprobs": None,
                         "finish_reason": c["finish_reason"]} for c in choices],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "system_fingerprint": None}


def chat_completion(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
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
