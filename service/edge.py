"""The edge: what every request passes before any route sees it, so that a
hostile client costs a bounded amount of memory and event-loop time.

`EdgeProtocol` is uvicorn's httptools protocol with the bounds httptools
lacks: the size and count of a request's headers, the time to receive them,
and the time to receive the body. A request over one is answered (431, 408)
and its connection closed; the app never sees it. `EdgeMiddleware` (ASGI)
gives every request an id, checks the bearer token, and refuses bodies over
the size limit, all before the body is read."""

from __future__ import annotations

import asyncio
import http
import secrets
import uuid
from dataclasses import dataclass

from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.contracts import REQUEST_ID_HEADER
from service.errors import TYPE_FOR_STATUS, error_body

REQUEST_ID_KEY = "specdrift.request_id"  # where the id waits in the ASGI scope
OPEN_PATHS = frozenset({"/health"})  # liveness probes carry no token
METRICS_PATH = "/metrics"


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_timeout_s: float


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; send_400_response answers it."""


def raw_error(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection."""
    body = error_body(status, message, TYPE_FOR_STATUS.get(status, "invalid_request_error"))
    return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class EdgeProtocol(HttpToolsProtocol):
    """httptools with bounded headers and receive times. uvicorn makes one per
    connection (server.py passes it as `http`, with its limits bound)."""

    def __init__(self, *args, limits: ConnectionLimits, on_reject, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.on_reject = on_reject
        self._reading_headers = True
        self._header_bytes = 0  # received while reading headers
        self._parsed_bytes = 0  # handed over by the parser: URL, names and values
        self._header_count = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str, str] | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, "header_timeout", "request headers")

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._reading_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # Headers still incomplete after this read: what httptools buffers is bounded by
        # the limit plus one read. (Checked after parsing, so a body in the same read does not count.)
        if self._reading_headers and self._header_bytes > self.limits.max_header_bytes:
            self._refuse(431, "headers_too_large", self._too_large())

    def _too_large(self) -> str:
        return f"request line and headers over {self.limits.max_header_bytes} bytes"

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a keep-alive connection's next request
            self._arm(self.limits.header_timeout_s, "header_timeout", "request headers")

    def on_url(self, url: bytes) -> None:
        self._parsed_bytes += len(url)
        self._check_headers()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._parsed_bytes += len(name) + len(value) + 4
        self._check_headers()
        super().on_header(name, value)

    def _check_headers(self) -> None:
        """Headers that arrived whole in one read: refused as the parser hands them over."""
        if self._header_count > self.limits.max_headers:
            self._refusal = (431, "headers_too_many", f"more than {self.limits.max_headers} headers")
        elif self._parsed_bytes > self.limits.max_header_bytes:
            self._refusal = (431, "headers_too_large", self._too_large())
        else:
            return
        raise _Refused

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._arm(self.limits.body_timeout_s, "body_timeout", "request body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self._reading_headers, self._header_bytes, self._parsed_bytes, self._header_count = True, 0, 0, 0
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(*self._refusal)

    def _arm(self, seconds: float, reason: str, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._refuse, 408, reason,
                                              f"{what} not received within {seconds:g} s")

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        self.on_reject(reason)
        cycle = self.cycle
        pending = cycle is not None and not cycle.response_complete
        if pending:
            # Its app (maybe waiting for this body) now reads a disconnect; its answer goes nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
        # Never inside an answer that has begun: then the connection just closes.
        if not pending or not (self._reading_headers or cycle.response_started):
            self.transport.write(raw_error(status, message))
        self.transport.close()


def _bearer(headers) -> bytes | None:
    value = next((v for k, v in headers if k == b"authorization"), None)
    if value is None:
        return None
    scheme, _, token = value.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


class EdgeMiddleware:
    """Gives every request an id (answered as X-Specdrift-Request-Id), checks
    the bearer token before the body is read (so a malformed body by a client
    without a token gets 401, not 400), and refuses bodies over the size limit
    before they are read into memory."""

    def __init__(self, app, max_body_bytes: int, on_reject, api_token: str | None = None,
                 metrics_token: str | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject
        self.api_token = api_token.encode() if api_token else None
        self.metrics_token = metrics_token.encode() if metrics_token else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope[REQUEST_ID_KEY] = request_id
        id_header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode())

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        if not self._authorized(scope):
            self.on_reject("unauthorized")
            await self._answer(send_with_id, 401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")])
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_body_bytes:
                self.on_reject("body_too_large")
                await self._answer(send_with_id, 413, f"request body over {self.max_body_bytes} bytes (or a bad "
                                                      f"Content-Length)", [(b"connection", b"close")])
                return
            await self.app(scope, receive, send_with_id)
            return
        await self.app(scope, self._counting(receive), send_with_id)

    def _authorized(self, scope) -> bool:
        path = scope["path"]
        if path in OPEN_PATHS:
            return True
        expected = self.metrics_token if path == METRICS_PATH else self.api_token
        if expected is None:
            return True
        sent = _bearer(scope["headers"])
        return sent is not None and secrets.compare_digest(sent, expected)

    def _counting(self, receive):
        """A receive that stops a chunked body once it passes the limit."""
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise StarletteHTTPException(413, f"request body over {self.max_body_bytes} bytes")
            return message

        return counted

    @staticmethod
    async def _answer(send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
        body = error_body(status, message, TYPE_FOR_STATUS[status])
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})
