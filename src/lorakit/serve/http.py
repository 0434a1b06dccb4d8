"""HTTP plumbing shared by the routes: settings, API keys, bounded JSON bodies, SSE, error rendering."""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from lorakit.serve.errors import (
    AuthenticationError,
    BadRequest,
    BodyTooLarge,
    InvalidParams,
    PermissionDenied,
    ServeError,
    Timeout,
)

M = TypeVar("M", bound=BaseModel)


@dataclass
class ServeSettings:
    """Server-wide limits (the CLI flags)."""

    base_name: str  # the `model` id that selects the plain base model
    api_key: str | None = None  # bearer key for every /v1 endpoint; admin endpoints need it always
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_tokens_cap: int = 512  # max_tokens above this get 400; the default for chat when unset
    request_timeout: float = 120.0  # seconds from arrival to the last token, else 408
    max_prompts: int = 16  # prompts in one /v1/completions request
    body_timeout: float = 30.0  # seconds to receive the whole request body, else 408 (slow clients)


def error_response(error: ServeError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def check_key(request: Request, settings: ServeSettings, admin: bool = False) -> None:
    """Inference: the key is needed only when one is configured. Admin: always (none configured = off)."""
    if settings.api_key is None:
        if admin:
            raise PermissionDenied("admin endpoints are disabled: start the server with --api-key")
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("missing API key: send the header 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise AuthenticationError("incorrect API key provided")


MAX_JSON_DEPTH = 32  # OpenAI bodies are at most ~5 deep; deeper ones are refused before validation


async def read_json(request: Request, limit: int, timeout: float = 30.0) -> dict[str, Any]:
    """The body as a JSON object, read at most `limit` bytes far (413 beyond, 400 if not JSON).

    The whole body must arrive within `timeout` seconds (408 otherwise: a client trickling bytes
    must not hold a connection forever). Bodies nested deeper than MAX_JSON_DEPTH and strings with
    lone UTF-16 surrogates (valid JSON, but not text any tokenizer can encode) are 400s.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
    except TimeoutError:
        raise Timeout(f"the request body did not arrive within {timeout:g} s", code="body_timeout") from None
    try:
        data = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"could not parse the JSON body: {exc}", code="invalid_json") from None
    except RecursionError:
        raise BadRequest(f"the JSON body is nested too deeply (limit {MAX_JSON_DEPTH})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("the JSON body must be an object", code="invalid_json")
    check_json_value(data)
    return data


def check_json_value(data: Any) -> None:
    """Refuse (400) values nested deeper than MAX_JSON_DEPTH or strings with lone surrogates."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, where or "body")
                stack.append((item, depth + 1, f"{where}.{key}" if where else str(key)))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, f"{where}.{i}") for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, where)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{where or 'a string'} contains a lone UTF-16 surrogate (e.g. \\ud800), which is not "
                         "valid text", param=where.split(".")[0] or None, code="invalid_text") from None


def parse(model: type[M], data: dict[str, Any]) -> M:
    """Validate `data` into `model`; a wrong type / missing field / out-of-range value is a 422."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidParams(f"{loc}: {first['msg']}" if loc else first["msg"], param=loc) from None


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n"
