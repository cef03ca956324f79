"""The gateway's FastAPI application: one OpenAI-compatible front for all arms.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
`GET /health`, `GET /metrics`. The `model` field names the arm. Shared state
lives in one `Gateway` object (one upstream client session, one record
store, one metrics registry per process), handed to the routes by closure.

The upstream client is aiohttp, not httpx: httpcore 1.0's connection pool
does O(connections²) work per request, which measured 1.6 ms of CPU per
streamed request at 16 concurrent streams and 3.9 ms at 64, against a flat
0.2 ms for aiohttp (benchmarks/gateway_overhead.py has the end-to-end
figures)."""

import asyncio
import contextlib
import logging
import secrets
import uuid

import aiohttp
from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from core.contracts import REQUEST_ID_HEADER
from service.errors import GatewayError, error_body, install_error_handlers
from service.measure import Measurement, RequestInfo
from service.metrics import GatewayMetrics
from service.records import RecordStore
from service.relay import Relay
from service.schemas import GENERATION_RESPONSES, TAG_PARAMETERS, GenerationRequest, request_models
from service.settings import GatewaySettings
from service.tags import LabelMapper, TagError, parse_tags
from service.upstreams import Arm, build_arms

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "specdrift.request_id"
DISCOVERY_RETRY_S = 5.0


class Gateway:
    """Per-process state: the arms, the shared upstream client, the store and the metrics."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.arms: dict[str, Arm] = build_arms(settings.upstreams)
        self.metrics = GatewayMetrics(list(self.arms))
        self.labels = LabelMapper(settings.vocabulary)
        self.token = settings.auth_token()
        self.store: RecordStore | None = None
        self.client: aiohttp.ClientSession | None = None

    def in_flight(self) -> int:
        return sum(arm.in_flight for arm in self.arms.values())

    def accept(self, request: Request, body: GenerationRequest, endpoint: str) -> Relay:
        """Check an incoming request and turn it into a relay to its arm."""
        try:
            tags = parse_tags(request.headers)
        except TagError as err:
            raise GatewayError(400, str(err), param="headers", reason="invalid_tag") from None
        arm = self.arms.get(body.model)
        if arm is None:
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
        info = RequestInfo(request_id=request.scope[REQUEST_ID_KEY], arm=arm.name, tags=tags,
                           labels=self.labels.labels(tags), endpoint=endpoint, stream=body.stream,
                           max_tokens=requested or limit, temperature=body.temperature)
        return Relay(self, arm, Measurement(info), payload, client_wants_usage=bool(
            client_stream_options.get("include_usage")), client_wants_token_ids=wants_token_ids)

    async def discover_served_models(self) -> None:
        """Learn each replica's served model name, so remote arms may serve any name."""
        pending = [r for arm in self.arms.values() for r in arm.replicas]
        while pending:
            for replica in list(pending):
                try:
                    async with self.client.get(replica.url + "/v1/models") as response:
                        served = [m["id"] for m in (await response.json(content_type=None))["data"]]
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError):
                    continue
                replica.served_model = replica.arm if replica.arm in served or not served else served[0]
                if replica.served_model != replica.arm:
                    log.info("arm %s: replica %s serves %r", replica.arm, replica.url, replica.served_model)
                pending.remove(replica)
            if pending:
                await asyncio.sleep(DISCOVERY_RETRY_S)


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


def create_app(settings: GatewaySettings) -> FastAPI:
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        gateway.store = RecordStore(settings.records_path)
        # sock_read bounds the silence between two reads, not the whole stream.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s,
                                        sock_read=settings.read_timeout_s)
        # No connection cap: the arms queue requests themselves, and a cap
        # here would turn load into pool waits misread as arm latency. Idle
        # connections are dropped before vLLM's uvicorn drops them (5 s), so a
        # request never goes out on a connection the server is closing.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=4)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as client:
            gateway.client = client
            discovery = asyncio.create_task(gateway.discover_served_models())
            log.info("gateway: arms %s; records in %s", ", ".join(gateway.arms), settings.records_path)
            try:
                yield
            finally:
                discovery.cancel()
                # Requests cancelled by the server's shutdown record themselves as they unwind.
                for _ in range(200):
                    if not gateway.in_flight():
                        break
                    await asyncio.sleep(0.01)
        gateway.store.close()
        log.info("gateway stopped: %d records written, %d failed", gateway.store.written, gateway.store.failed)

    app = FastAPI(title="specdrift gateway", version="1", lifespan=lifespan,
                  description="One OpenAI-compatible front for all arms; measures and records every request.")
    app.state.gateway = gateway
    install_error_handlers(app, lambda reason: gateway.metrics.rejected.labels(reason).inc())
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.max_body_bytes,
                       on_reject=lambda reason: gateway.metrics.rejected.labels(reason).inc())

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return Response(error_body(500, f"gateway error: {type(err).__name__}", "internal_error"), status_code=500,
                        media_type="application/json")

    bearer = HTTPBearer(auto_error=False)

    async def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(),
                                                             gateway.token.encode()):
            raise GatewayError(401, "missing or wrong bearer token", reason="unauthorized",
                               headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(require_token)] if gateway.token else []
    # Models built here, with this gateway's bound; the endpoints' annotations
    # name them directly (so this module does without postponed annotations).
    CompletionRequest, ChatCompletionRequest = request_models(settings.max_tokens_limit, list(gateway.arms))
    generation = dict(dependencies=guarded, responses=GENERATION_RESPONSES, response_class=Response,
                      openapi_extra={"parameters": TAG_PARAMETERS})

    @app.post("/v1/completions", summary="Text completion from the arm named by `model`", **generation)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return gateway.accept(request, body, "completions")

    @app.post("/v1/chat/completions", summary="Chat completion from the arm named by `model`", **generation)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return gateway.accept(request, body, "chat")

    @app.get("/v1/models", dependencies=guarded, summary="The arms, as OpenAI models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "specdrift"}
                                           for name in gateway.arms]}

    @app.get("/health", summary="Liveness: 200 while the record store is writable")
    async def health() -> JSONResponse:
        store = gateway.store
        healthy = store is not None and store.alive()
        body = {"status": "ok" if healthy else "records store down",
                "arms": {name: {"replicas": [r.url for r in arm.replicas], "in_flight": arm.in_flight}
                         for name, arm in gateway.arms.items()},
                "records": {"path": str(settings.records_path), "written": store.written if store else 0,
                            "failed": store.failed if store else 0}}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics", summary="Prometheus exposition", response_class=Response)
    async def metrics() -> Response:
        return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
