"""One error shape for every failure a client can see, and the handlers that produce it.

Body: `{"error": {"message": ..., "type": ..., "param": ..., "code": <status>}}`. Messages name the offending
field; no traceback or internal path ever reaches a client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """Raised by routes for a client-visible failure."""

    def __init__(self, status: int, message: str, error_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param


def error_response(status: int, message: str, error_type: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    return JSONResponse(status_code=status, content=body)


def _field_path(location: tuple[Any, ...]) -> str:
    parts = [str(part) for part in location if part != "body"]
    return ".".join(parts) if parts else "body"


def _validation_message(error: dict[str, Any]) -> tuple[str, str]:
    field = _field_path(tuple(error.get("loc", ())))
    kind = error.get("type", "")
    if kind == "json_invalid":
        return "body", "request body is not valid JSON"
    if kind == "missing":
        return field, f"{field}: field required"
    if field == "body" and kind in ("dict_type", "model_attributes_type"):
        return field, "body: must be a JSON object (sent as Content-Type: application/json)"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return field, f"{field}: {message}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.error_type, error.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        if any(item.get("type") == "json_invalid" for item in errors):
            return error_response(400, "request body is not valid JSON", "invalid_json", "body")
        field, message = _validation_message(errors[0]) if errors else ("body", "invalid request")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(422, message, "invalid_request", field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), "http_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "internal_error")
