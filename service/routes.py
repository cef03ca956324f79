"""The gateway's routes: `POST /v1/completions`, `POST /v1/chat/completions`,
`GET /v1/models`, `GET /health`, `GET /metrics`. The `model` field names the
arm.

`build_router` makes the router once per app, because the request models
carry that gateway's max_tokens bound and arm names. Routes reach the
gateway's state through the `get_gateway` dependency; `require_token` guards
the API when a bearer token is set."""

# No postponed annotations here: the endpoints are annotated with the request
# models passed to build_router, which FastAPI could not resolve from strings.

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from service.errors import GatewayError
from service.gateway import Gateway
from service.schemas import GENERATION_RESPONSES, TAG_PARAMETERS, ChatCompletionRequest, CompletionRequest

bearer = HTTPBearer(auto_error=False)


def get_gateway(request: Request) -> Gateway:
    """The app's Gateway (create_app stores it on app.state)."""
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def require_token(gateway: GatewayDep,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), gateway.token.encode()):
        raise GatewayError(401, "missing or wrong bearer token", reason="unauthorized",
                           headers={"WWW-Authenticate": "Bearer"})


def build_router(completion: type[CompletionRequest], chat: type[ChatCompletionRequest], *,
                 auth: bool) -> APIRouter:
    """The routes, with request bodies `completion` and `chat` (service.schemas.request_models);
    with `auth`, all but /health and /metrics need the bearer token."""
    router = APIRouter()
    # Only when auth is on, so that the OpenAPI document asks for a token only then.
    guarded = [Depends(require_token)] if auth else []
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

    @router.get("/health", summary="Liveness: 200 while the record store is writable")
    async def health(gateway: GatewayDep) -> JSONResponse:
        store = gateway.store
        healthy = store is not None and store.alive()
        body = {"status": "ok" if healthy else "records store down",
                "arms": {name: {"replicas": [r.url for r in upstream.replicas], "in_flight": upstream.in_flight}
                         for name, upstream in gateway.arms.items()},
                "records": {"path": str(gateway.settings.records_path), "written": store.written if store else 0,
                            "failed": store.failed if store else 0}}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @router.get("/metrics", summary="Prometheus exposition", response_class=Response)
    async def metrics(gateway: GatewayDep) -> Response:
        return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router
