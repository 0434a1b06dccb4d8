"""uvicorn's h11 connection protocol with two changes, so no client can hold the server hostage
and every error is an OpenAI error object:

* a request's line and headers must arrive within ``header_timeout`` seconds of the connection
  opening (or of the previous response on a keep-alive connection), else 408 and close — uvicorn
  itself waits forever for slow headers; slow *bodies* are timed out by the app
  (:func:`lorakit.serve.http.read_json`);
* malformed HTTP gets a JSON ``{"error": {...}}`` 400 instead of uvicorn's plain text.

Passed to uvicorn (``http=...``) by ``lorakit serve``, which runs :class:`DrainingServer`: SIGTERM
drains (new requests 503, running ones finish within a timeout) before uvicorn's own shutdown.
"""

from __future__ import annotations

import json
import signal
import threading

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


def _error_body(message: str, code: str, kind: str = "invalid_request_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


def protocol_class(header_timeout: float) -> type[H11Protocol]:
    """An H11Protocol subclass with this header timeout (uvicorn instantiates it per connection)."""

    class OpenAIH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            if not self.transport.is_closing():
                self._header_timer = self.loop.call_later(header_timeout, self._header_timed_out)

        def _cancel_header_timer(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def _header_timed_out(self) -> None:
            self._header_timer = None
            waiting_for_request = self.cycle is None or self.cycle.response_complete
            if self.transport.is_closing() or not waiting_for_request:
                return
            if self.conn.our_state is not h11.IDLE or (
                    self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]):
                # a response was already sent on this cycle (e.g. the app's 408 for a slow body), or an
                # idle keep-alive connection: just close it
                self.transport.close()
                return
            self._send_json(408, "Request Timeout",
                            _error_body(f"the request line and headers did not arrive within {header_timeout:g} s",
                                        "request_timeout", "timeout_error"))

        def send_400_response(self, msg: str) -> None:
            self._send_json(400, "Bad Request", _error_body(f"malformed HTTP request: {msg}", "invalid_http"))

        def _send_json(self, status: int, reason: str, body: bytes) -> None:
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            try:  # h11 may refuse to speak after a protocol error: write the bytes ourselves then
                if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    out = self.conn.send(h11.Response(status_code=status, headers=headers, reason=reason.encode()))
                    out += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
                else:
                    raise h11.LocalProtocolError("not in a state to respond")
            except h11.LocalProtocolError:
                head = f"HTTP/1.1 {status} {reason}\r\n".encode() + b"".join(
                    k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
                out = head + body
            self.transport.write(out)
            self.transport.close()

    return OpenAIH11Protocol


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM drains instead of closing the listener at once.

    Draining: :class:`lorakit.serve.ops.Drain` makes the app answer new requests (``/health``
    included, so a load balancer stops sending) with 503 while requests in flight finish; once
    none is left, or after `drain_timeout` seconds, uvicorn's normal shutdown runs (the engine
    stops, what is still queued gets a "shutting down" error). A second signal, or SIGINT, stops
    at once as before. The process then exits with status 0 rather than re-raising the signal.
    """

    def __init__(self, config: uvicorn.Config, drain, drain_timeout: float):
        super().__init__(config)
        self.drain, self.drain_timeout = drain, drain_timeout
        self.drained: bool | None = None  # True: every request finished; False: the timeout hit

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGTERM and not self.drain.draining and not self.should_exit:
            self.drain.start()  # not recorded as captured: uvicorn won't re-raise it, the exit status is 0
            threading.Thread(target=self._finish_drain, name="lorakit-drain", daemon=True).start()
            return
        super().handle_exit(sig, frame)

    def _finish_drain(self) -> None:
        self.drained = self.drain.wait_idle(self.drain_timeout)
        self.should_exit = True  # uvicorn's main loop looks at this every tick
