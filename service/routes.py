"""The gateway's routes: `POST /v1/completions`, `POST /v1/chat/completions`,
`GET /v1/models`, `GET /health`, `GET /metrics`. The `model` field names the
arm.

`build_router` makes the router once per app, because the request models
carry that gateway's bounds and arm names. Routes reach the gateway's state
through the `get_gateway` dependency. Bodies are read as strict JSON (no NaN
or Infinity), and only after a cheap count of their values (`{`, `[`, `,`)
stays under `max_json_values`, which bounds the parser's time. The bearer
token is checked earlier, in service/edge.py."""

# No postponed annotations here: the endpoints are annotated with the request
# models passed to build_router, which FastAPI could not resolve from strings.

import json
import math
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from service.gateway import Gateway
from service.schemas import GENERATION_RESPONSES, TAG_PARAMETERS, ChatCompletionRequest, CompletionRequest

bearer = HTTPBearer(auto_error=False)


def get_gateway(request: Request) -> Gateway:
    """The app's Gateway (create_app stores it on app.state)."""
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _finite(number: str) -> float:
    value = float(number)
    if not math.isfinite(value):
        raise ValueError(f"{number} is out of range")
    return value


# Built once: json.loads with hooks would build a decoder per request.
STRICT_JSON = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite)


def strict_json_route(max_json_values: int) -> type[APIRoute]:
    """An APIRoute whose requests parse their bodies as strict JSON, after bounding their size in values."""

    class StrictJsonRequest(Request):
        async def json(self):
            if not hasattr(self, "_json"):
                body = await self.body()
                # Counted on the raw bytes (inside strings too), in C: ~1 ms per MB, and no count can
                # exceed the body's length.
                if len(body) > max_json_values and body.count(b",") + body.count(b"{") + body.count(
                        b"[") > max_json_values:
                    raise StarletteHTTPException(413, f"request body has over {max_json_values} JSON values")
                try:
                    self._json = STRICT_JSON.decode(body.decode())  # JSON is UTF-8 (RFC 8259)
                except json.JSONDecodeError:
                    raise
                except ValueError as err:  # NaN, 1e999, bad UTF-8, over-long integers
                    raise json.JSONDecodeError(str(err), "", 0) from None
            return self._json

    class StrictJsonRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def strict(request: Request) -> Response:
                return await handler(StrictJsonRequest(request.scope, request.receive))

            return strict

    return StrictJsonRoute


def build_router(completion: type[CompletionRequest], chat: type[ChatCompletionRequest], *,
                 auth: bool, max_json_values: int, expose_internals: bool) -> APIRouter:
    """The routes, with request bodies `completion` and `chat` (service.schemas.request_models); with `auth`, the
    OpenAPI document asks for the bearer token; `expose_internals` shows URLs and paths in /health."""
    router = APIRouter(route_class=strict_json_route(max_json_values))
    # Declares the scheme in the OpenAPI document, only when auth is on; EdgeMiddleware enforces it.
    guarded = [Depends(bearer)] if auth else []
    generation = dict(dependencies=guarded, responses=GENERATION_RESPONSES, response_class=Response,
                      openapi_extra={"parameters": TAG_PARAMETERS})

    @router.post("/v1/completions", summary="Text completion from the arm named by `model`", **generation)
    async def completions(body: completion, request: Request, gateway: GatewayDep) -> Response:
        return gateway.accept(request, body, "completions")

    @router.post("/v1/chat/completions", summary="Chat completion from the arm named by `model`", **generation)
    async def chat_completions(body: chat, request: Request, gateway: GatewayDep) -> Response:
        return gateway.accept(request, body, "chat")

    @router.get("/v1/models", dependencies=guarded, summary="The arms, as OpenAI models")
    async def models(gateway: GatewayDep) -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "specdrift"}
                                           for name in gateway.arms]}

    # Still 200 while a PostgreSQL store buffers through an outage: a restart would lose the buffer.
    @router.get("/health", summary="Liveness: 200 while the record store is writable")
    async def health(gateway: GatewayDep) -> JSONResponse:
        store = gateway.store
        healthy = store is not None and store.alive()
        arms = {name: {"replicas": len(upstream.replicas), "in_flight": upstream.in_flight}
                for name, upstream in gateway.arms.items()}
        records = {"written": store.written if store else 0, "failed": store.failed if store else 0,
                   "buffered": store.backlog() if store else 0, "reachable": store.reachable() if store else False}
        if expose_internals:
            for name, upstream in gateway.arms.items():
                arms[name]["urls"] = [r.url for r in upstream.replicas]
            records["path"] = store.where if store else str(gateway.settings.records_path)
        body = {"status": "ok" if healthy else "records store down", "arms": arms, "records": records}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @router.get("/metrics", summary="Prometheus exposition", response_class=Response)
    async def metrics(gateway: GatewayDep) -> Response:
        return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router
