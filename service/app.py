"""The gateway's FastAPI application: one OpenAI-compatible front for all arms.

`create_app` puts it together: the per-process `Gateway` (service/gateway.py),
stored on `app.state` where the routes' `get_gateway` dependency finds it; its
lifespan; the edge middleware (request ids, bearer token, body limit); the
OpenAI-style error handlers; and the router (service/routes.py)."""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request
from starlette.responses import Response

from service.edge import EdgeMiddleware
from service.errors import error_body, install_error_handlers
from service.gateway import Gateway
from service.routes import build_router
from service.schemas import request_models
from service.settings import GatewaySettings

log = logging.getLogger(__name__)


async def _unexpected(request: Request, err: Exception) -> Response:
    log.exception("unexpected error on %s", request.url.path)
    return Response(error_body(500, f"gateway error: {type(err).__name__}", "internal_error"), status_code=500,
                    media_type="application/json")


def create_app(settings: GatewaySettings) -> FastAPI:
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async with gateway.serving():
            yield

    app = FastAPI(title="specdrift gateway", version="1", lifespan=lifespan,
                  description="One OpenAI-compatible front for all arms; measures and records every request.")
    app.state.gateway = gateway
    install_error_handlers(app, gateway.count_rejection)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(EdgeMiddleware, max_body_bytes=settings.max_body_bytes, on_reject=gateway.count_rejection,
                       api_token=gateway.token, metrics_token=settings.metrics_token())
    # This gateway's bounds and arm names are part of the request schema.
    completion, chat = request_models(settings.max_tokens_limit, list(gateway.arms), max_messages=settings.max_messages,
                                      max_prompt_chars=settings.max_prompt_chars,
                                      max_prompt_tokens=settings.max_prompt_tokens)
    app.include_router(build_router(completion, chat, auth=bool(gateway.token),
                                    max_json_values=settings.max_json_values,
                                    expose_internals=settings.expose_internals))
    return app
