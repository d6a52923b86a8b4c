"""Every failure a client can see goes through here, in the error shape of the dialect it spoke.

A route's dialect decides the body (`ErrorShape`): rerankd's own is
`{"error": {"message", "type", "param", "code"}}`; TEI clients read `{"error", "error_type"}`, Jina clients
`detail`, Cohere clients `message`. Messages name the offending field; no traceback or internal path ever
reaches a client. 429 and 503 carry `Retry-After`, which Cohere's and Mixedbread's clients honour, except
for a model that failed to load, which no retry helps.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from enum import StrEnum
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from rerankd.api.state import record_of

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
MAX_MESSAGE_CHARS = 1000
INLINE_PARSE_BYTES = 64 * 1024  # bodies up to this size are parsed on the event loop: a thread costs more
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
        retry: bool = True,
    ) -> None:
        """`retry` False: a 503 that asking again will not change (a model that failed to load), answered
        without `Retry-After`, which Cohere's and Mixedbread's clients would otherwise follow forever."""
        if len(message) > MAX_MESSAGE_CHARS:  # messages may quote client input: never echo megabytes back
            message = message[:MAX_MESSAGE_CHARS] + "… (cut)"
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.headers = dict(headers or {})
        self.retry = retry


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

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_then_handle(request: Request) -> Response:
            await parse_json_body(request)
            return await handler(request)

        return parse_then_handle


async def parse_json_body(request: Request) -> None:
    """Parse a JSON body before FastAPI does, which then takes the result: a large body in a worker thread
    (parsing 16 MB takes the event loop away from every other request for a second), and whatever the parser
    refuses (invalid UTF-8, an integer of thousands of digits, nesting past the recursion limit) is the
    invalid-JSON error naming the body, not a generic 400."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type and "json" not in content_type:
        return  # FastAPI hands such a body to validation as bytes: a 422 naming the body
    body = await request.body()
    if not body:
        return
    try:
        if len(body) > INLINE_PARSE_BYTES:
            request._json = await run_in_threadpool(json.loads, body)
        else:
            request._json = json.loads(body)
    except RecursionError as error:
        raise _invalid_json("nested too deeply") from error
    except UnicodeDecodeError as error:
        raise _invalid_json("not UTF-8") from error
    except json.JSONDecodeError as error:
        raise _invalid_json(f"{error.msg} at character {error.pos}") from error
    except ValueError as error:  # an integer past Python's digit limit
        raise _invalid_json(str(error).split(";")[0]) from error


def _invalid_json(reason: str) -> APIError:
    return APIError(400, f"request body is not valid JSON ({reason})", ErrorType.INVALID_JSON, "body")


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


def error_headers(error: APIError) -> dict[str, str]:
    """The headers of an error's answer: its own, `Retry-After` on 429 and 503 (unless no retry helps), the
    auth scheme on 401."""
    headers = dict(error.headers)
    if error.status in (429, 503) and error.retry:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def _respond(request: Request, error: APIError, body: Any = None) -> JSONResponse:
    return JSONResponse(
        status_code=error.status, content=_shape(request, body)(error), headers=error_headers(error)
    )


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
