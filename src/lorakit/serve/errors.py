"""Errors the server turns into OpenAI-style error objects: ``{"error": {message, type, param, code}}``.

Each carries its HTTP status, so every layer (registry, engine, routes) raises one class and the
app's single handler renders it. Anything else escaping a route is a bug, logged and rendered as
a 500 in the same shape.
"""

from __future__ import annotations

from typing import Any


class ServeError(Exception):
    """A request failed for a reason the client can act on."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(ServeError):
    status, code = 400, "invalid_request"


class InvalidParams(ServeError):
    """The JSON parsed but a field has the wrong type, is missing, or is out of range."""

    status, code = 422, "invalid_value"


class AuthenticationError(ServeError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class PermissionDenied(ServeError):
    status, type, code = 403, "permission_error", "forbidden"


class NotFound(ServeError):
    status, code = 404, "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(ServeError):
    status, code = 409, "conflict"


class BodyTooLarge(ServeError):
    status, code = 413, "request_too_large"


class Timeout(ServeError):
    status, type, code = 408, "timeout_error", "request_timeout"


class Overloaded(ServeError):
    status, type, code = 429, "rate_limit_error", "queue_full"


class EngineError(ServeError):
    """The model failed on this request (e.g. non-finite logits from a broken adapter)."""

    status, type, code = 500, "server_error", "generation_failed"


class EngineUnavailable(ServeError):
    """The generation worker is not running (``/health`` says so instead of answering ok)."""

    status, type, code = 503, "server_error", "engine_unavailable"


class ClientDisconnected(ServeError):
    """The client went away before a non-streaming response was ready (nginx's 499; nobody reads it)."""

    status, code = 499, "client_closed_request"
