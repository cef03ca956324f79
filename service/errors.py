"""Every error the gateway answers is in OpenAI's format:
`{"error": {"message", "type", "param", "code"}}`, with `code` the HTTP status
(as vLLM does). Errors whose cause is the upstream carry the header
`X-Specdrift-Error-Source: upstream`, so a client (or a test) can tell them
from the gateway's own."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from core.contracts import UPSTREAM_DIED, UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE

ERROR_SOURCE_HEADER = "X-Specdrift-Error-Source"

# Error `type` for each status the gateway itself answers with; an upstream
# failure is typed by its record status.
TYPE_FOR_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    431: "invalid_request_error",
    500: "internal_error",
    502: UPSTREAM_DIED,
    503: UPSTREAM_UNAVAILABLE,
    504: UPSTREAM_TIMEOUT,
}


class GatewayError(Exception):
    """An error the gateway answers directly (before or instead of proxying)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, reason: str | None = None,
                 error_type: str | None = None, from_upstream: bool = False,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        # Why a request was rejected before it was accepted (a bounded metric label).
        self.reason = reason
        self.message = message
        self.param = param
        self.error_type = error_type or TYPE_FOR_STATUS.get(status, "error")
        self.from_upstream = from_upstream
        self.headers = headers or {}


def error_body(status: int, message: str, error_type: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": error_type, "param": param, "code": status}}).encode()


def error_response(err: GatewayError) -> Response:
    headers = dict(err.headers)
    if err.from_upstream:
        headers[ERROR_SOURCE_HEADER] = "upstream"
    return Response(error_body(err.status, err.message, err.error_type, err.param), status_code=err.status,
                    media_type="application/json", headers=headers)


def _validation_message(err: RequestValidationError) -> tuple[int, str, str | None]:
    errors = err.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error")
        return 400, "request body is not valid JSON" + (f" ({detail})" if detail else ""), None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not loc:
        return 422, "the body must be a JSON object, sent with Content-Type: application/json", None
    # OpenAI names the top-level field; deeper parts of loc (union members, items) go in the message.
    param = loc[0]
    more = len(errors) - 1
    return 422, f"{'.'.join(loc)}: {first.get('msg', 'invalid value')}" + (
        f" (and {more} more problem{'s' * (more > 1)})" if more else ""), param


def install_error_handlers(app: FastAPI, on_reject) -> None:
    """Route FastAPI's own errors into OpenAI's format. `on_reject(reason)` counts each rejection."""

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, err: GatewayError) -> Response:
        if err.reason:
            on_reject(err.reason)
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, err: RequestValidationError) -> Response:
        status, message, param = _validation_message(err)
        on_reject("invalid_json" if status == 400 else "invalid_request")
        return error_response(GatewayError(status, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
        on_reject({404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(err.status_code, "http_error"))
        return error_response(GatewayError(err.status_code, str(err.detail), headers=dict(err.headers or {})))
