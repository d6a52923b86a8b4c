"""Every failure a client can see goes through here, in the error shape of the dialect it spoke.

A route's dialect decides the body (`ErrorShape`): rerankd's own is
`{"error": {"message", "type", "param", "code"}}`; TEI clients read `{"error", "error_type"}`, Jina clients
`detail`, Cohere clients `message`. Messages name the offending field; no traceback or internal path ever
reaches a client. 429 and 503 carry `Retry-After`, which Cohere's and Mixedbread's clients honour.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from rerankd.api.state import record_of

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
MAX_MESSAGE_CHARS = 1000
# Tags of the request unions a route may take (see `rerankd.api.routes`): part of pydantic's error location,
# never a field a client sent.
UNION_TAGS = frozenset({"rerankd request", "tei request"})
# The failures every rerank route documents in its OpenAPI entry.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Malformed JSON"},
    401: {"description": "Missing or invalid API key (when the server has --api-key)"},
    404: {"description": "Unknown model"},
    413: {"description": "Too many documents, or a pair over the model's limit with truncation off"},
    422: {"description": "Invalid field"},
    429: {"description": "Queue full; retry after `Retry-After` seconds"},
}


class ErrorType(StrEnum):
    """rerankd's own error types: the `type` of its native error body, which dialects translate."""

    INVALID_REQUEST = "invalid_request"  # a field is missing, of the wrong type or out of range
    INVALID_JSON = "invalid_json"
    TOO_MANY_DOCUMENTS = "too_many_documents"  # --max-documents
    TOO_LONG = "too_long"  # a text over --max-document-chars
    INPUT_TOO_LONG = "input_too_long"  # a pair over the model's limit, with truncation off
    REQUEST_TOO_LARGE = "request_too_large"  # a body over --max-request-bytes
    UNAUTHORIZED = "unauthorized"
    MODEL_NOT_FOUND = "model_not_found"
    UNAVAILABLE = "unavailable"  # the model is loading, or failed to load
    OVERLOADED = "overloaded"  # --max-queued-pairs
    TIMEOUT = "timeout"  # --request-timeout
    CLIENT_CLOSED = "client_closed"
    HTTP_ERROR = "http_error"  # routing's own: unknown path, wrong method
    INTERNAL_ERROR = "internal_error"


class APIError(Exception):
    """Raised by routes for a client-visible failure, in rerankd's own terms; dialects translate it."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: ErrorType,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if len(message) > MAX_MESSAGE_CHARS:  # messages may quote client input: never echo megabytes back
            message = message[:MAX_MESSAGE_CHARS] + "… (cut)"
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.headers = dict(headers or {})


ErrorShape = Callable[[APIError], dict[str, Any]]


def native_error(error: APIError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.status,
        }
    }


class DialectRoute(APIRoute):
    """A route that knows its dialect's error shape; `body` is the raw JSON when the request had one."""

    error_shape: ErrorShape = staticmethod(native_error)

    def error_shape_for(self, body: Any) -> ErrorShape:
        return self.error_shape

    def error_shape_for_start(self, body_start: bytes) -> ErrorShape:
        """The shape for a request refused before its body was parsed (too large): from what was read."""
        return self.error_shape


def dialect_route(shape: ErrorShape) -> type[DialectRoute]:
    """A route class for an `APIRouter(route_class=...)` whose errors take `shape`."""
    return type(f"{shape.__name__}_route", (DialectRoute,), {"error_shape": staticmethod(shape)})


def _shape(request: Request, body: Any = None) -> ErrorShape:
    record = record_of(request)
    if record is not None and record.error_shape is not None:
        return record.error_shape
    route = request.scope.get("route")
    if isinstance(route, DialectRoute):
        return route.error_shape_for(body)
    return native_error


def leaf_routes(routes: Iterable[BaseRoute]) -> Iterable[BaseRoute]:
    """Routes, with FastAPI's included routers (`original_router`) opened up (none of ours has a prefix)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from leaf_routes(included.routes)
        else:
            yield route


def error_body_for(
    scope: Scope, routes: Iterable[BaseRoute], error: APIError, body_start: bytes
) -> dict[str, Any]:
    """`error` in the shape of the route `scope` is for, found by matching (before routing has run), for a
    request of which only `body_start` was read."""
    for route in leaf_routes(routes):
        if isinstance(route, DialectRoute) and route.matches(scope)[0] == Match.FULL:
            return route.error_shape_for_start(body_start)(error)
    return native_error(error)


def _respond(request: Request, error: APIError, body: Any = None) -> JSONResponse:
    headers = dict(error.headers)
    if error.status in (429, 503):
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(status_code=error.status, content=_shape(request, body)(error), headers=headers)


def _field_path(location: tuple[Any, ...]) -> str:
    parts = [str(part) for part in location if part != "body" and part not in UNION_TAGS]
    return ".".join(parts) if parts else "body"


def _validation_error(error: dict[str, Any]) -> APIError:
    field = _field_path(tuple(error.get("loc", ())))
    kind = error.get("type", "")
    if kind == "missing":
        message = f"{field}: field required"
    elif field == "body" and kind in ("dict_type", "model_attributes_type"):
        message = "body: must be a JSON object (sent as Content-Type: application/json)"
    else:
        message = f"{field}: " + str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(422, message, ErrorType.INVALID_REQUEST, field)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return _respond(request, error)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        if any(item.get("type") == "json_invalid" for item in errors):
            invalid = APIError(400, "request body is not valid JSON", ErrorType.INVALID_JSON, "body")
            return _respond(request, invalid)
        first = (
            _validation_error(errors[0])
            if errors
            else APIError(422, "invalid request", ErrorType.INVALID_REQUEST)
        )
        if len(errors) > 1:
            first.message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return _respond(request, first, error.body)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        http_error = APIError(
            error.status_code, str(error.detail), ErrorType.HTTP_ERROR, headers=error.headers
        )
        return _respond(request, http_error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return _respond(request, APIError(500, "internal server error", ErrorType.INTERNAL_ERROR))
