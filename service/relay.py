"""Proxying one accepted request: stream from the arm, measure every chunk,
pass the stream on (or assemble one response), and record the outcome.

`Relay` is an ASGI response, so it controls exactly when the client's status
line goes out: only once the arm has sent its first event. Until then any
failure still becomes a proper HTTP error (503, 504, the arm's own 4xx).
After that, a failure becomes an SSE error event that ends the stream.

A task watches for the client going away and cancels the relay; cancelling
closes the upstream connection, which makes vLLM abort the request.

A relay gets what all relays share (`RelayContext`) from its caller and
knows nothing of the application around it."""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from starlette.responses import Response

from core.contracts import (CLIENT_DISCONNECT, GATEWAY_SHUTDOWN, OK, UPSTREAM_DIED, UPSTREAM_ERROR, UPSTREAM_TIMEOUT,
                            UPSTREAM_UNAVAILABLE)
from service.assemble import Assembly
from service.errors import ERROR_SOURCE_HEADER, error_body
from service.measure import Measurement
from service.metrics import GatewayMetrics
from service.records import RecordStore, RecordStoreError
from service.upstreams import Replica, Upstream

UPSTREAM_PATH = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
# Fields the gateway asks the arm for on its own behalf, cut out of each event
# again unless the client asked for them. Done on the bytes, which is ten
# times cheaper than re-serializing every chunk, and exact: inside a JSON
# string every quote is escaped, so `,"key":` (or `"key":` followed by a value
# and a comma) can only be a key. vLLM writes compact JSON with these keys
# after `index`: the first pattern; other spacing takes the general one.
_INJECTED_KEYS = rb'"(?:prompt_token_ids|token_ids|prompt_text)"'
_INJECTED_COMPACT = re.compile(rb"," + _INJECTED_KEYS + rb":(?:null|\[[0-9,]*\])")
_INJECTED_VALUE = _INJECTED_KEYS + rb"\s*:\s*(?:null|\[[0-9,\s]*\])"
_INJECTED_ANY = re.compile(rb"\s*,\s*" + _INJECTED_VALUE + rb"|" + _INJECTED_VALUE + rb"\s*,\s*")


def strip_injected(data: bytes) -> bytes:
    data = _INJECTED_COMPACT.sub(b"", data)
    if b'_ids"' in data or b'_text"' in data:
        data = _INJECTED_ANY.sub(b"", data)
    return data


@dataclass(frozen=True, slots=True)
class RelayContext:
    """What every relay of one gateway shares."""

    client: aiohttp.ClientSession
    store: RecordStore
    metrics: GatewayMetrics
    read_timeout_s: float  # only for the messages: the client session applies it


class UpstreamFailure(Exception):
    def __init__(self, status: str, http_status: int, message: str, client_told: bool = False):
        super().__init__(message)
        self.status = status
        self.http_status = http_status
        self.message = message
        # The arm's own error event already went to the client.
        self.client_told = client_told


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def split_events(buffer: bytearray) -> list[bytes]:
    """Complete SSE events' data fields, removed from the front of `buffer`."""
    if b"\r" in buffer:
        buffer[:] = buffer.replace(b"\r\n", b"\n")
    found = []
    while (end := buffer.find(b"\n\n")) >= 0:
        event = bytes(buffer[:end])
        del buffer[:end + 2]
        if event.startswith(b"data: ") and b"\n" not in event:
            found.append(event[6:])  # vLLM's one-line events: the fast path
            continue
        data = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        if data:
            found.append(b"\n".join(data))
    return found


class Relay(Response):
    """The route's response; FastAPI calls it as an ASGI app."""

    def __init__(self, context: RelayContext, upstream: Upstream, measurement: Measurement,
                 payload: dict[str, Any], client_wants_usage: bool, client_wants_token_ids: bool):
        self.background = None  # what FastAPI expects of a Response
        self.context = context
        self.upstream = upstream
        self.measurement = measurement
        self.payload = payload
        self.client_wants_usage = client_wants_usage
        self.client_wants_token_ids = client_wants_token_ids
        info = measurement.info
        self.stream = info.stream
        self.assembly = None if info.stream else Assembly(info.endpoint, upstream.name, client_wants_token_ids)
        self.client_gone = False
        self.recorded = False
        self.finished = False
        self.started = False

    # --- ASGI ---------------------------------------------------------------
    async def __call__(self, scope, receive, send) -> None:
        task = asyncio.current_task()
        watcher = asyncio.create_task(self._cancel_on_disconnect(receive, task))
        self.upstream.in_flight += 1
        in_flight = self.context.metrics.in_flight.labels(self.upstream.name)
        in_flight.inc()
        try:
            await self._relay(send)
        except asyncio.CancelledError:
            self._finish_cancelled()
            if not self.client_gone:
                raise  # the server is stopping: let the cancellation run its course
            task.uncancel()
        finally:
            watcher.cancel()
            self.upstream.in_flight -= 1
            in_flight.dec()

    async def _cancel_on_disconnect(self, receive, task: asyncio.Task) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        if not self.finished:  # after the last byte, uvicorn reports a disconnect too
            self.client_gone = True
            task.cancel()

    # --- the exchange ----------------------------------------------------------
    async def _relay(self, send) -> None:
        try:
            replica, response = await self._open()
        except UpstreamFailure as failure:
            await self._fail(send, failure)
            return
        reusable = False
        try:
            if response.status != 200:
                await self._pass_upstream_error(send, response)
                return
            chunks = response.content.iter_any()
            failure = await self._pump(send, chunks)
            if failure is None:
                # Read the body's end (right behind [DONE]) so the connection can be reused.
                async for _ in chunks:
                    pass
                reusable = True
        finally:
            replica.outstanding -= 1
            # Closing (rather than releasing) a connection mid-stream is what
            # tells vLLM to abort the request.
            if reusable:
                response.release()
            else:
                response.close()
        if failure is not None:
            await self._fail(send, failure)

    async def _open(self) -> tuple[Replica, aiohttp.ClientResponse]:
        """Send the request to the least busy replica; if it cannot be reached, try the next.

        A connection that breaks before any answer counts as unreachable too,
        after one retry on a fresh connection: a pooled connection may have
        been closed by the arm a moment earlier, and a dying arm may still
        accept connections for a moment without answering them."""
        context, upstream, info = self.context, self.upstream, self.measurement.info
        url_path = UPSTREAM_PATH[info.endpoint]
        headers = {"content-type": "application/json", "accept-encoding": "identity",
                   "x-request-id": info.request_id}
        last_error = "no replica"
        for replica in upstream.by_preference():
            self.payload["model"] = replica.served_model or upstream.name
            body = json.dumps(self.payload).encode()
            for attempt in (1, 2):
                replica.outstanding += 1
                try:
                    response = await context.client.post(replica.url + url_path, data=body, headers=headers)
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError,
                        aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as err:
                    replica.outstanding -= 1
                    last_error = f"{replica.url}: {type(err).__name__}: {err}"
                    if attempt == 1 and not isinstance(err, (aiohttp.ClientConnectorError,
                                                             aiohttp.ConnectionTimeoutError)):
                        continue
                    replica.refused()
                    break
                except asyncio.TimeoutError as err:
                    replica.outstanding -= 1
                    self.measurement.upstream = replica.url
                    raise UpstreamFailure(UPSTREAM_TIMEOUT, 504, f"arm {upstream.name!r} did not answer within "
                                          f"{context.read_timeout_s:g}s ({type(err).__name__})") from None
                except aiohttp.ClientError as err:
                    replica.outstanding -= 1
                    self.measurement.upstream = replica.url
                    raise UpstreamFailure(UPSTREAM_DIED, 502, f"arm {upstream.name!r} failed: "
                                          f"{type(err).__name__}: {err}") from None
                except BaseException:
                    replica.outstanding -= 1
                    raise
                self.measurement.upstream = replica.url
                return replica, response
        raise UpstreamFailure(UPSTREAM_UNAVAILABLE, 503, f"arm {upstream.name!r} is unreachable ({last_error})")

    async def _pump(self, send, chunks) -> UpstreamFailure | None:
        """Relay the arm's events until [DONE]; returns the failure that ended it early, if any."""
        measurement, assembly = self.measurement, self.assembly
        chat = measurement.info.endpoint == "chat"
        forward = self._forwarder()
        buffer = bytearray()
        try:
            async for raw in chunks:
                now = time.perf_counter()
                buffer += raw
                outgoing = []
                failure = None
                for data in split_events(buffer):
                    if data == DONE:
                        return await self._complete(send, outgoing)
                    try:
                        event = json.loads(data)
                    except ValueError:
                        failure = UpstreamFailure(UPSTREAM_ERROR, 502,
                                                  f"arm sent an event that is not JSON: {data[:200]!r}")
                        break
                    if not isinstance(event, dict):
                        continue
                    if "error" in event:  # vLLM's error event; nothing after it counts
                        error = event["error"]
                        message = error.get("message") if isinstance(error, dict) else str(error)
                        failure = UpstreamFailure(UPSTREAM_ERROR, 502, f"arm reported an error mid-stream: "
                                                  f"{message}", client_told=assembly is None)
                        if assembly is None:
                            outgoing.append(forward(data))
                        break
                    choices = event.get("choices")
                    if choices:
                        self._measure(now, choices[0], chat)
                    if event.get("usage"):
                        measurement.usage = event["usage"]
                        metrics = event.get("metrics")
                        if isinstance(metrics, dict):
                            measurement.spec = metrics.get("speculative_decoding")
                    if assembly is not None:
                        assembly.add(event)
                    elif choices or (self.client_wants_usage and event.get("usage")):
                        outgoing.append(forward(data))
                if outgoing:
                    await self._send_stream(send, b"".join(outgoing))
                if failure is not None:
                    return failure
        except asyncio.TimeoutError:
            return UpstreamFailure(UPSTREAM_TIMEOUT, 504, f"arm {self.upstream.name!r} sent nothing for "
                                   f"{self.context.read_timeout_s:g}s")
        except aiohttp.ClientError as err:
            return UpstreamFailure(UPSTREAM_DIED, 502, f"arm {self.upstream.name!r} broke the stream: "
                                   f"{type(err).__name__}: {err}")
        return UpstreamFailure(UPSTREAM_DIED, 502, f"arm {self.upstream.name!r} ended the stream without [DONE]")

    def _measure(self, now: float, choice: dict[str, Any], chat: bool) -> None:
        if chat:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            carries = text or delta.get("reasoning") or delta.get("reasoning_content") or delta.get("tool_calls")
        else:
            text = carries = choice.get("text")
        token_ids = choice.get("token_ids")
        if token_ids:
            self.measurement.on_output(now, token_ids, text)
        elif token_ids is None and carries:
            self.measurement.on_output(now, None, text)
        if choice.get("finish_reason"):
            self.measurement.finish_reason = choice["finish_reason"]

    def _forwarder(self):
        """How an arm's event becomes the client's: without the injected fields, under the arm's name."""
        strip = not self.client_wants_token_ids
        served, arm = self.payload["model"], self.upstream.name
        renamed = (b'"model":' + json.dumps(served).encode(), b'"model":' + json.dumps(arm).encode()) \
            if served != arm else None

        def forward(data: bytes) -> bytes:
            if strip:
                data = strip_injected(data)
            if renamed:
                data = data.replace(*renamed, 1)
            return b"data: " + data + b"\n\n"

        return forward

    # --- endings -------------------------------------------------------------
    async def _complete(self, send, outgoing: list[bytes]) -> None:
        record = self.measurement.record(OK, 200)
        await self._commit(record)
        if self.stream:
            await self._send_stream(send, b"".join(outgoing) + DONE_EVENT, last=True)
        else:
            await self._send_whole(send, 200, json.dumps(self.assembly.response(), ensure_ascii=False).encode())

    async def _fail(self, send, failure: UpstreamFailure) -> None:
        http_status = 200 if self.started else failure.http_status
        record = self.measurement.record(failure.status, http_status, failure.message)
        await self._commit(record)
        if failure.client_told:
            await self._send_stream(send, DONE_EVENT, last=True)
        elif self.started:
            error = {"message": failure.message, "type": failure.status, "param": None, "code": failure.http_status}
            await self._send_stream(send, sse_data({"error": error}) + DONE_EVENT, last=True)
        else:
            await self._send_whole(send, failure.http_status,
                                   error_body(failure.http_status, failure.message, failure.status), from_upstream=True)

    async def _pass_upstream_error(self, send, response: aiohttp.ClientResponse) -> None:
        """The arm refused the request (e.g. a prompt too long): pass its answer on."""
        body = await response.read()
        try:
            parsed = json.loads(body)
            message = str(parsed["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = body[:500].decode(errors="replace") or f"HTTP {response.status}"
            body = error_body(response.status, message, UPSTREAM_ERROR)
        record = self.measurement.record(UPSTREAM_ERROR, response.status, message)
        await self._commit(record)
        await self._send_whole(send, response.status, body, from_upstream=True)

    def _finish_cancelled(self) -> None:
        """Record a request cut short by the client leaving or the gateway stopping."""
        if self.recorded:  # cut short while its record was being committed: that record stands
            return
        status = CLIENT_DISCONNECT if self.client_gone else GATEWAY_SHUTDOWN
        record = self.measurement.record(status, 200 if self.started else None,
                                         "client disconnected" if self.client_gone else "gateway stopped")
        self.context.store.write_nowait(record)
        self.context.metrics.observe(record, self.measurement.info.labels, self.measurement.gaps)

    async def _commit(self, record: dict[str, Any]) -> None:
        """Store the record, and wait for it, before the client hears the request is done."""
        self.recorded = True
        try:
            await self.context.store.write(record)
        except RecordStoreError:
            self.context.metrics.record_write_failures.inc()
        self.context.metrics.observe(record, self.measurement.info.labels, self.measurement.gaps)

    # --- to the client -----------------------------------------------------------
    @staticmethod
    def _headers(content_type: bytes, upstream_error: bool = False) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", content_type)]
        if upstream_error:
            headers.append((ERROR_SOURCE_HEADER.lower().encode(), b"upstream"))
        return headers

    async def _send_stream(self, send, body: bytes, last: bool = False) -> None:
        if not self.started:
            self.started = True
            headers = self._headers(b"text/event-stream; charset=utf-8") + [(b"cache-control", b"no-cache")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
        if last:
            self.finished = True
        await send({"type": "http.response.body", "body": body, "more_body": not last})

    async def _send_whole(self, send, status: int, body: bytes, from_upstream: bool = False) -> None:
        self.started = self.finished = True
        headers = self._headers(b"application/json", upstream_error=from_upstream)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
