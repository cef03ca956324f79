"""The ASGI middleware that every request passes before it reaches a route."""

from __future__ import annotations

import uuid

from starlette.exceptions import HTTPException as StarletteHTTPException

from core.contracts import REQUEST_ID_HEADER
from service.errors import error_body

REQUEST_ID_KEY = "specdrift.request_id"  # where the id waits in the ASGI scope


class EdgeMiddleware:
    """Gives every request an id (answered as X-Specdrift-Request-Id) and
    refuses bodies over the size limit before they are read into memory."""

    def __init__(self, app, max_body_bytes: int, on_reject):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject

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

        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.max_body_bytes:
                await self._too_large(send_with_id)
                return
            await self.app(scope, receive, send_with_id)
            return
        await self.app(scope, self._counting(receive), send_with_id)

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

    async def _too_large(self, send) -> None:
        self.on_reject("body_too_large")
        body = error_body(413, f"request body over {self.max_body_bytes} bytes (or a bad Content-Length)",
                          "invalid_request_error")
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
