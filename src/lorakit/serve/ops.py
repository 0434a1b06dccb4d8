"""Operations: ``GET /metrics`` (Prometheus), one JSON access-log line per request, drain on SIGTERM.

* ``/metrics`` (Prometheus text format, ``prometheus_client``; behind the API key when one is set):
  requests by route and status, request latency histograms, prompt / generated tokens, queue
  depth, running rows, registered / resident adapters, adapter installs, evictions and folder
  reads, host memory held by adapter copies, decode steps.
* Access log: logger ``lorakit.access``, one JSON object per request when its response ends:
  time, request id (echoed as ``X-Request-Id``), method, path, status, duration, client address,
  the body's ``model`` / ``stream`` / ``max_tokens`` and the response's ``usage`` — never prompt
  or completion text.
* Drain (:class:`Drain`): on SIGTERM the server stops taking work — new requests get 503
  ``shutting_down`` (``/health`` too, so a load balancer takes the replica out) — while requests
  already running finish, for at most ``--drain-timeout`` seconds; then it exits with status 0.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone

from fastapi import FastAPI, Request
from fastapi.responses import Response

from lorakit.serve.http import ServeSettings, check_key

access_logger = logging.getLogger("lorakit.access")
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters", "/v1/stats", "/health",
          "/metrics")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_BODY_PEEK = 64 * 1024  # request / response bytes kept to read model, stream, usage (JSON fields only)


class Drain:
    """Requests in flight, and whether the server is draining (refusing new work)."""

    def __init__(self) -> None:
        self.draining = False
        self._inflight = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    @property
    def inflight(self) -> int:
        return self._inflight

    def enter(self) -> None:
        with self._lock:
            self._inflight += 1

    def leave(self) -> None:
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    def start(self) -> None:
        self.draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is in flight (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True


class _Metrics:
    """The app's own Prometheus registry (several apps in one process never collide)."""

    def __init__(self, engine, registry) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter("lorakit_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("lorakit_http_request_duration_seconds", "HTTP request time, arrival to the "
                                 "last byte of the response", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)

        class _Live:  # read at scrape time from the engine and the adapter registry
            def collect(self):
                stats = asdict(engine.stats)
                counters = {
                    "lorakit_prompt_tokens": ("prompt tokens prefilled", stats.get("prompt_tokens", 0)),
                    "lorakit_generated_tokens": ("tokens generated", stats.get("generated_tokens", 0)),
                    "lorakit_decode_steps": ("batched decode steps", stats["steps"]),
                    "lorakit_prefills": ("prefills run", stats["prefills"]),
                    "lorakit_engine_failures": ("engine iterations or rows that failed", stats["failures"]),
                    "lorakit_adapter_loads": ("adapters made resident", registry.loads),
                    "lorakit_adapter_evictions": ("resident adapters evicted to make room", registry.evictions),
                    "lorakit_adapter_reads": ("adapter folders read and validated", registry.reads),
                }
                for name, (doc, value) in counters.items():
                    yield CounterMetricFamily(name, doc, value=value)
                gauges = {
                    "lorakit_queue_depth": ("requests waiting for a batch row", engine.queue_depth),
                    "lorakit_running_rows": ("rows in the running batch", engine.running_rows),
                    "lorakit_adapters_registered": ("adapters the server knows", len(registry.names())),
                    "lorakit_adapters_resident": ("adapters usable by a forward pass now", len(registry.loaded)),
                    "lorakit_adapters_max_resident": ("--max-adapters", registry.max_loaded),
                    "lorakit_adapter_host_bytes": ("host memory held by registered adapters' factors",
                                                   registry.store.nbytes),
                    "lorakit_engine_alive": ("1 while the generation worker runs", int(engine.alive)),
                }
                for name, (doc, value) in gauges.items():
                    yield GaugeMetricFamily(name, doc, value=value)

        self.registry.register(_Live())

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def add_ops(app: FastAPI, engine, registry, settings: ServeSettings) -> Drain:
    """/metrics, the access log and the drain gate on `app`; returns the app's :class:`Drain`."""
    drain = Drain()
    metrics = _Metrics(engine, registry)
    app.state.drain = drain

    @app.get("/metrics")
    async def prometheus_metrics(request: Request):
        check_key(request, settings)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.add_middleware(_OpsMiddleware, drain=drain, metrics=metrics)
    return drain


class _OpsMiddleware:
    """Pure ASGI (streams pass through untouched): counts, times and logs each request; refuses new
    ones with 503 while draining."""

    def __init__(self, app, drain: Drain, metrics: _Metrics):
        self.app, self.drain, self.metrics = app, drain, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")
        request_id = uuid.uuid4().hex
        start = time.perf_counter()
        seen = {"status": 500, "request": bytearray(), "response": bytearray(), "json": False}

        if self.drain.draining and route != "/metrics":
            await _refuse(send, request_id)
            self._record(scope, route, 503, start, request_id, seen)
            return

        async def peek_receive():
            message = await receive()
            if message["type"] == "http.request" and len(seen["request"]) < _BODY_PEEK:
                seen["request"] += message.get("body", b"")[: _BODY_PEEK - len(seen["request"])]
            return message

        async def tagged_send(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                headers = list(message.get("headers", []))
                seen["json"] = any(k.lower() == b"content-type" and v.startswith(b"application/json")
                                   for k, v in headers)
                message = {**message, "headers": headers + [(b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body" and seen["json"] and len(seen["response"]) < _BODY_PEEK:
                seen["response"] += message.get("body", b"")[: _BODY_PEEK - len(seen["response"])]
            await send(message)

        counted = route not in ("/health", "/metrics")  # probes never hold up a drain
        if counted:
            self.drain.enter()
        try:
            await self.app(scope, peek_receive, tagged_send)
        finally:
            if counted:
                self.drain.leave()
            self._record(scope, route, seen["status"], start, request_id, seen)

    def _record(self, scope, route: str, status: int, start: float, request_id: str, seen: dict) -> None:
        duration = time.perf_counter() - start
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.latency.labels(route).observe(duration)
        if route in ("/health", "/metrics") or not access_logger.isEnabledFor(logging.INFO):
            return
        line = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "request_id": request_id,
                "method": scope.get("method"), "path": scope.get("path"), "status": status,
                "duration_s": round(duration, 4), "client": (scope.get("client") or [None])[0]}
        line.update(_fields(seen["request"], ("model", "stream", "max_tokens", "n")))
        usage = _fields(seen["response"], ("usage",)).get("usage")
        if isinstance(usage, dict):
            line["usage"] = {k: v for k, v in usage.items() if isinstance(v, int)}
        access_logger.info(json.dumps(line, separators=(",", ":")))


def _fields(raw: bytes | bytearray, keys: tuple[str, ...]) -> dict:
    """Only these top-level JSON fields, and only scalars or dicts of scalars: never prompt text."""
    if not raw:
        return {}
    try:
        data = json.loads(bytes(raw))
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    out = {}
    for key in keys:
        value = data.get(key)
        if isinstance(value, (str, int, float, bool)) and not (isinstance(value, str) and len(value) > 200):
            out[key] = value
        elif isinstance(value, dict):
            out[key] = value
    return out


async def _refuse(send, request_id: str) -> None:
    body = json.dumps({"error": {"message": "the server is shutting down; retry on another replica",
                                 "type": "server_error", "param": None, "code": "shutting_down"}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), (b"retry-after", b"1"),
                            (b"x-request-id", request_id.encode())]})
    await send({"type": "http.response.body", "body": body})
