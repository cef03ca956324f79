"""Proxying one accepted request: stream from the arm, measure every chunk,
pass the stream on (or assemble one response), and record the outcome.

`Relay` is an ASGI response, so it controls exactly when the client's status
line goes out: only once the arm has sent its first event. Until then any
failure still becomes a proper HTTP error (503, 504, the arm's own 4xx).
After that, a failure becomes an SSE error event that ends the stream.

A task watches for the client going away and cancels the relay; cancelling
closes the upstream connection, which makes vLLM abort the request. A relay
cancelled by the gateway stopping answers a 503, or an SSE error event once
the stream has started.

Whatever the arm sends, the request ends in one record and the client gets
an answer: every value the gateway takes from an event is checked
(service/measure.py), and one it cannot take ends the request as
`upstream_invalid`. The client hears a request is done only once its record
is stored; if it cannot be, it gets an error instead.

A relay gets what all relays share (`RelayContext`) from its caller and
knows nothing of the application around it."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from starlette.responses import Response

from core.contracts import (CLIENT_DISCONNECT, GATEWAY_SHUTDOWN, OK, UPSTREAM_DIED, UPSTREAM_ERROR, UPSTREAM_INVALID,
                            UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE)
from service.assemble import Assembly
from service.errors import ERROR_SOURCE_HEADER, error_body
from service.measure import Measurement, UpstreamInvalid, shown
from service.metrics import GatewayMetrics
from service.records import RecordStoreError, RecordWriter, storable_text
from service.upstreams import Replica, Upstream

log = logging.getLogger(__name__)

UPSTREAM_PATH = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
# Bounds on what an arm can make the gateway hold. vLLM's largest event is a
# chat stream's first, with the prompt's token ids: well under 1 MiB.
MAX_EVENT_BYTES = 4 * 2 ** 20
MAX_ERROR_BODY_BYTES = 64 * 2 ** 10
MAX_ERROR_MESSAGE = 1000
# How long a relay cut by shutdown may take to tell its client.
SHUTDOWN_ANSWER_S = 1.0
RECORD_STORE_ERROR = "record_store_error"  # the error type when a record cannot be stored
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
    store: RecordWriter
    metrics: GatewayMetrics
    read_timeout_s: float  # only for the messages: the client session applies it
    expose_internals: bool = False  # clients see `detail` (upstream URLs) too


class UpstreamFailure(Exception):
    """`message` goes to the client; `detail` (what may name upstream URLs) to the record only."""

    def __init__(self, status: str, http_status: int, message: str, client_told: bool = False,
                 detail: str | None = None):
        super().__init__(message)
        self.status = status
        self.http_status = http_status
        self.message = message
        self.detail = detail
        # The arm's own error event already went to the client.
        self.client_told = client_told

    @property
    def recorded(self) -> str:
        return f"{self.message}: {self.detail}" if self.detail else self.message


def sse_data(payload: dict[str, Any]) -> bytes:
    # ASCII JSON: no text can make this fail to encode.
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def not_json(constant: str) -> None:
    """json's parse_constant: NaN and Infinity are not JSON, so no client should get them."""
    raise ValueError(f"{constant} is not JSON")


def arm_message(value: Any) -> str:
    """An arm's error message as the gateway passes it on: text, storable, bounded."""
    return storable_text(value if type(value) is str else str(value))[:MAX_ERROR_MESSAGE]


async def read_bounded(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or its first `limit` bytes."""
    body = bytearray()
    while len(body) < limit:
        piece = await content.read(limit - len(body))
        if not piece:
            break
        body += piece
    return bytes(body)


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
            task.uncancel()
            if not self.client_gone:  # the server is stopping
                watcher.cancel()
                try:
                    await asyncio.wait_for(self._answer_shutdown(send), SHUTDOWN_ANSWER_S)
                except asyncio.TimeoutError:
                    pass  # a client that does not read: uvicorn closes the connection
        except Exception as err:  # a bug, or an arm's answer nothing above foresaw: still one record, one answer
            log.exception("relaying request %s failed", self.measurement.info.request_id)
            if not self.recorded:
                await self._fail(send, UpstreamFailure(UPSTREAM_INVALID, 502, f"the gateway could not relay arm "
                                                       f"{self.upstream.name!r}: {type(err).__name__}"))
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
                    # Not redirected: the gateway measures the replica it was given.
                    response = await context.client.post(replica.url + url_path, data=body, headers=headers,
                                                         allow_redirects=False)
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
                    raise UpstreamFailure(UPSTREAM_DIED, 502, f"arm {upstream.name!r} failed ({type(err).__name__})",
                                          detail=f"{replica.url}: {err}") from None
                except BaseException:
                    replica.outstanding -= 1
                    raise
                self.measurement.upstream = replica.url
                return replica, response
        raise UpstreamFailure(UPSTREAM_UNAVAILABLE, 503, f"arm {upstream.name!r} is unreachable", detail=last_error)

    async def _pump(self, send, chunks) -> UpstreamFailure | None:
        """Relay the arm's events until [DONE]; returns the failure that ended it early, if any."""
        measurement, assembly, arm = self.measurement, self.assembly, self.upstream.name
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
                        if b"NaN" in data or b"Infinity" in data:  # rare: only then parse again, strictly
                            json.loads(data, parse_constant=not_json)
                    except (ValueError, RecursionError):
                        failure = UpstreamFailure(UPSTREAM_ERROR, 502,
                                                  f"arm sent an event that is not JSON: {data[:200]!r}")
                        break
                    try:
                        if type(event) is not dict:
                            raise UpstreamInvalid(f"an event is {shown(event)}, not an object")
                        if "error" in event:  # vLLM's error event; nothing after it counts
                            failure = self._arm_error(event["error"], data, outgoing, forward)
                            break
                        measurement.take(now, event, chat)
                        if assembly is not None:
                            assembly.add(event)
                    except UpstreamInvalid as err:
                        failure = UpstreamFailure(UPSTREAM_INVALID, 502, f"arm {arm!r} sent an invalid event: {err}")
                        break
                    except Exception as err:  # whatever else in an event cannot be taken is the arm's doing too
                        log.exception("arm %r: an event the gateway cannot take: %r", arm, data[:200])
                        failure = UpstreamFailure(UPSTREAM_INVALID, 502, f"arm {arm!r} sent an event the gateway "
                                                  f"cannot take ({type(err).__name__})")
                        break
                    if assembly is None and (event.get("choices") or self.client_wants_usage and event.get("usage")):
                        outgoing.append(forward(data))
                if failure is None and len(buffer) > MAX_EVENT_BYTES:
                    failure = UpstreamFailure(UPSTREAM_INVALID, 502,
                                              f"arm {arm!r} sent an event over {MAX_EVENT_BYTES} bytes")
                if outgoing:
                    await self._send_stream(send, b"".join(outgoing))
                if failure is not None:
                    return failure
        except asyncio.TimeoutError:
            return UpstreamFailure(UPSTREAM_TIMEOUT, 504, f"arm {arm!r} sent nothing for "
                                   f"{self.context.read_timeout_s:g}s")
        except aiohttp.ClientError as err:
            return UpstreamFailure(UPSTREAM_DIED, 502, f"arm {arm!r} broke the stream ({type(err).__name__})",
                                   detail=str(err))
        return UpstreamFailure(UPSTREAM_DIED, 502, f"arm {arm!r} ended the stream without [DONE]")

    def _arm_error(self, error: Any, data: bytes, outgoing: list[bytes], forward) -> UpstreamFailure:
        """The arm's own error event: passed on as it is if its message is clean text, else as the gateway's.

        An arm that refuses the request itself (a 4xx code, before any output: vLLM checks a prompt's token ids
        only once it has begun to stream) keeps its code, as it would have without the gateway's streaming."""
        message = error.get("message") if type(error) is dict else error
        text = arm_message(message)
        as_is = self.assembly is None and type(message) is str and text == message
        if as_is:
            outgoing.append(forward(data))
        code = error.get("code") if type(error) is dict else None
        refused = type(code) is int and 400 <= code <= 499 and self.measurement.first_token is None
        return UpstreamFailure(UPSTREAM_ERROR, code if refused else 502, f"arm reported an error mid-stream: {text}",
                               client_told=as_is)

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
            if b"\n" in data:  # an event sent as several data lines; in parsed JSON a newline is only whitespace
                data = data.replace(b"\n", b"")
            return b"data: " + data + b"\n\n"

        return forward

    # --- endings -------------------------------------------------------------
    async def _complete(self, send, outgoing: list[bytes]) -> None:
        if self.stream:
            body = b"".join(outgoing) + DONE_EVENT
        else:
            try:
                body = json.dumps(self.assembly.response(), ensure_ascii=False).encode()
            except (ValueError, RecursionError) as err:  # a lone surrogate: UnicodeEncodeError, a ValueError
                await self._fail(send, UpstreamFailure(UPSTREAM_INVALID, 502, f"arm {self.upstream.name!r} sent "
                                                       f"values that make no JSON response: {type(err).__name__}"))
                return
        if not await self._commit(self.measurement.record(OK, 200)):
            await self._unrecorded(send)
        elif self.stream:
            await self._send_stream(send, body, last=True)
        else:
            await self._send_whole(send, 200, body)

    async def _fail(self, send, failure: UpstreamFailure) -> None:
        http_status = 200 if self.started else failure.http_status
        # Stored or not, the client hears of a failure.
        await self._commit(self.measurement.record(failure.status, http_status, failure.recorded))
        if failure.client_told:
            await self._send_stream(send, DONE_EVENT, last=True)
        else:
            told = failure.recorded if self.context.expose_internals else failure.message
            await self._send_error(send, failure.http_status, told, failure.status, from_upstream=True)

    async def _pass_upstream_error(self, send, response: aiohttp.ClientResponse) -> None:
        """The arm refused the request (e.g. a prompt too long): pass its answer on."""
        status = response.status
        if not 400 <= status <= 599:
            await self._fail(send, UpstreamFailure(UPSTREAM_INVALID, 502, f"arm {self.upstream.name!r} answered "
                                                   f"HTTP {status}, not 200 with an event stream"))
            return
        try:
            body = await read_bounded(response.content, MAX_ERROR_BODY_BYTES)
        except (asyncio.TimeoutError, aiohttp.ClientError) as err:
            body = f"HTTP {status}, then {type(err).__name__} while reading the body".encode()
        try:
            message = json.loads(body)["error"]["message"]
            passed_on = type(message) is str and arm_message(message) == message
        except (ValueError, KeyError, TypeError, RecursionError):
            message, passed_on = body[:500].decode(errors="replace") or f"HTTP {status}", False
        message = arm_message(message)
        if not passed_on:
            body = error_body(status, message, UPSTREAM_ERROR)
        await self._commit(self.measurement.record(UPSTREAM_ERROR, status, message))
        await self._send_whole(send, status, body, from_upstream=True)

    def _finish_cancelled(self) -> None:
        """Record a request cut short by the client leaving or the gateway stopping."""
        if self.recorded:  # cut short while its record was being committed: that record stands
            return
        if self.client_gone:
            record = self.measurement.record(CLIENT_DISCONNECT, 200 if self.started else None, "client disconnected")
        else:
            record = self.measurement.record(GATEWAY_SHUTDOWN, 200 if self.started else 503, "gateway stopped")
        self.context.store.write_nowait(record, self._on_stored(record))

    async def _answer_shutdown(self, send) -> None:
        """Tell the client that the gateway stopped before its request was done."""
        if not self.finished:
            await self._send_error(send, 503, "the gateway stopped before this request was done; retry it",
                                   GATEWAY_SHUTDOWN)

    async def _unrecorded(self, send) -> None:
        """The record could not be stored: the client must not hear the request is done."""
        await self._send_error(send, 503, "the gateway could not record this request", RECORD_STORE_ERROR)

    async def _commit(self, record: dict[str, Any]) -> bool:
        """Store the record, and wait for it, before the client hears the request is done; False if it cannot be."""
        self.recorded = True
        try:
            await self.context.store.write(record, self._on_stored(record))
        except RecordStoreError:
            return False  # the store has counted and logged it
        return True

    def _on_stored(self, record: dict[str, Any]):
        """Counts the record once it is committed, even if this relay is cancelled meanwhile."""
        return functools.partial(self.context.metrics.observe, record, self.measurement.info.labels,
                                 self.measurement.gaps)

    # --- to the client -----------------------------------------------------------
    async def _send_error(self, send, status: int, message: str, error_type: str, from_upstream: bool = False) -> None:
        """An OpenAI-format error: the response itself, or an SSE error event once the stream has started."""
        if self.started:
            error = {"message": message, "type": error_type, "param": None, "code": status}
            await self._send_stream(send, sse_data({"error": error}) + DONE_EVENT, last=True)
        else:
            await self._send_whole(send, status, error_body(status, message, error_type), from_upstream=from_upstream)

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
