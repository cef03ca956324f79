"""One gateway process's state, in one `Gateway` object: the arms' upstreams,
the label vocabulary, the bearer token, and, while the app is serving, the
record store and the upstream client session. It turns an accepted request
into a `Relay`. The routes (service/routes.py) reach it through a dependency.

Should the record writer ever stop, nothing more can be recorded: /health
fails (503), the gateway stops as on SIGTERM, and the process exits with
status 3 so that compose (`restart: unless-stopped`) or Kubernetes starts a
new one; a timer exits it anyway if that stop takes too long.

The record store is SQLite (`records_path`) or, with `records_url`, the
PostgreSQL store shared by replicas (service/records_postgres.py). While
`records_buffer` records wait for an unreachable database, new requests are
refused with a 503 (`record_store_error`; counted as rejected, reason
`records_buffer_full`) instead of accepting records that could not be kept.

The upstream client is aiohttp, not httpx: httpcore 1.0's connection pool
does O(connections²) work per request, which measured 1.6 ms of CPU per
streamed request at 16 concurrent streams and 3.9 ms at 64, against a flat
0.2 ms for aiohttp (benchmarks/gateway_overhead.py has the end-to-end
figures)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator

import aiohttp
from fastapi import Request

from service.edge import REQUEST_ID_KEY
from service.errors import GatewayError
from service.measure import Measurement, RequestInfo
from service.metrics import GatewayMetrics
from service.records import RecordStore, RecordStoreError, RecordWriter
from service.records_postgres import PostgresRecordStore
from service.relay import RECORD_STORE_ERROR, Relay, RelayContext
from service.schemas import GenerationRequest
from service.settings import GatewaySettings
from service.tags import LabelMapper, TagError, parse_tags
from service.upstreams import Upstream, build_upstreams

log = logging.getLogger(__name__)

DISCOVERY_RETRY_S = 5.0
WRITER_STOPPED_EXIT = 3
# Beyond shutdown_grace_s, what the stop after a writer failure may take before a hard exit.
WRITER_STOPPED_EXIT_MARGIN_S = 10.0


def open_record_store(settings: GatewaySettings, on_failure=None, on_stop=None) -> RecordWriter:
    """The store the settings name: PostgreSQL with `records_url`, else the SQLite file. A store that cannot be
    opened raises RecordStoreError, its message one line that starts with the setting."""
    try:
        if settings.records_url:
            return PostgresRecordStore(settings.records_url, settings.records_password(), on_failure, on_stop,
                                       settings.replica, synchronous_commit=settings.records_synchronous_commit)
        return RecordStore(settings.records_path, on_failure, on_stop, settings.replica)
    except RecordStoreError as err:
        raise RecordStoreError(f"gateway.{'records_url' if settings.records_url else 'records_path'}: {err}") from None


class Gateway:
    """Per-process state: the arms, the shared upstream client, the store and the metrics."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.arms: dict[str, Upstream] = build_upstreams(settings.upstreams)
        self.metrics = GatewayMetrics(list(self.arms), vllm_names=settings.vllm_metric_names)
        self.labels = LabelMapper(settings.vocabulary)
        self.token = settings.auth_token()
        # Both set by serving(), for the app's lifetime.
        self.store: RecordWriter | None = None
        self.relay_context: RelayContext | None = None
        self.writer_stopped = False

    def in_flight(self) -> int:
        return sum(upstream.in_flight for upstream in self.arms.values())

    def count_rejection(self, reason: str) -> None:
        self.metrics.rejected.labels(reason).inc()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """The app's lifespan: open the store and the upstream client, and on
        the way out give cancelled requests a moment to record themselves."""
        settings = self.settings
        self.store = open_record_store(settings, on_failure=self.metrics.count_write_failure,
                                       on_stop=self._on_writer_stopped)
        self.metrics.records_buffered.set_function(self.store.backlog)
        # sock_read bounds the silence between two reads, not the whole stream.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s,
                                        sock_read=settings.read_timeout_s)
        # No connection cap: the arms queue requests themselves, and a cap
        # here would turn load into pool waits misread as arm latency. Idle
        # connections are dropped before vLLM's uvicorn drops them (5 s), so a
        # request never goes out on a connection the server is closing.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as client:
            self.relay_context = RelayContext(client, self.store, self.metrics, settings.read_timeout_s,
                                              settings.expose_internals)
            discovery = asyncio.create_task(self.discover_served_models(client))
            log.info("gateway: arms %s; records in %s (replica %s)", ", ".join(self.arms), self.store.where,
                     self.store.replica)
            try:
                yield
            finally:
                discovery.cancel()
                # Requests cancelled by the server's shutdown record themselves as they unwind.
                for _ in range(200):
                    if not self.in_flight():
                        break
                    await asyncio.sleep(0.01)
        self.store.close()
        log.info("gateway stopped: %d records written, %d failed", self.store.written, self.store.failed)
        if self.writer_stopped:
            log.critical("exiting with status %d: the record writer had stopped", WRITER_STOPPED_EXIT)
            os._exit(WRITER_STOPPED_EXIT)

    def _on_writer_stopped(self) -> None:
        """The store's on_stop, in its writer thread: stop serving, then exit non-zero (the module docstring)."""
        self.writer_stopped = True
        deadline = self.settings.shutdown_grace_s + WRITER_STOPPED_EXIT_MARGIN_S
        log.critical("the record writer stopped: stopping the gateway (exit within %gs)", deadline)
        timer = threading.Timer(deadline, os._exit, (WRITER_STOPPED_EXIT,))
        timer.daemon = True
        timer.start()
        os.kill(os.getpid(), signal.SIGTERM)

    def accept(self, request: Request, body: GenerationRequest, endpoint: str) -> Relay:
        """Check an incoming request and turn it into a relay to its arm."""
        if self.store.backlog() >= self.settings.records_buffer:
            raise GatewayError(503, f"the record store is unreachable and {self.store.backlog()} records wait for "
                               f"it; retry later", reason="records_buffer_full", error_type=RECORD_STORE_ERROR,
                               headers={"Retry-After": "1"})
        try:
            tags = parse_tags(request.headers)
        except TagError as err:
            raise GatewayError(400, str(err), param="headers", reason="invalid_tag") from None
        upstream = self.arms.get(body.model)
        if upstream is None:
            raise GatewayError(404, f"unknown arm {body.model!r}; arms are: {', '.join(self.arms)}", param="model",
                               reason="unknown_arm")
        requested = body.requested_max_tokens()  # the schema holds it to the limit
        limit = self.settings.max_tokens_limit
        payload = body.model_dump(exclude_unset=True)
        if requested is None:
            payload["max_tokens"] = limit
        # Always stream from the arm, with usage (and vLLM's per-request
        # speculative metrics, which ride on the usage chunk) and token ids.
        client_stream_options = payload.get("stream_options") or {}
        payload["stream"] = True
        payload["stream_options"] = {**client_stream_options, "include_usage": True}
        wants_token_ids = bool(payload.get("return_token_ids"))
        payload["return_token_ids"] = True
        info = RequestInfo(request_id=request.scope[REQUEST_ID_KEY], arm=upstream.name, tags=tags,
                           labels=self.labels.labels(tags), endpoint=endpoint, stream=body.stream,
                           max_tokens=requested or limit, temperature=body.temperature)
        return Relay(self.relay_context, upstream, Measurement(info), payload, client_wants_usage=bool(
            client_stream_options.get("include_usage")), client_wants_token_ids=wants_token_ids)

    async def discover_served_models(self, client: aiohttp.ClientSession) -> None:
        """Learn each replica's served model name, so remote arms may serve any name."""
        pending = [r for upstream in self.arms.values() for r in upstream.replicas]
        while pending:
            for replica in list(pending):
                try:
                    async with client.get(replica.url + "/v1/models") as response:
                        served = [m["id"] for m in (await response.json(content_type=None))["data"]]
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
                    continue
                replica.served_model = replica.arm if replica.arm in served or not served else served[0]
                if replica.served_model != replica.arm:
                    log.info("arm %s: replica %s serves %r", replica.arm, replica.url, replica.served_model)
                pending.remove(replica)
            if pending:
                await asyncio.sleep(DISCOVERY_RETRY_S)
