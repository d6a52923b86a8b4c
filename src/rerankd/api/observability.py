"""Per-request plumbing around the app: request ids, the body size limit, timing headers, metrics and one
structured log line per request (never a body or a document).

A plain ASGI middleware (not `BaseHTTPMiddleware`), so the route still sees the client's disconnect.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rerankd.api.errors import APIError, ErrorType, error_body_for, leaf_routes
from rerankd.api.state import RequestRecord
from rerankd.metrics import ServerMetrics

access_log = logging.getLogger("rerankd.access")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _route_path(scope: Scope, routes: Iterable[BaseRoute]) -> str:
    route = scope.get("route")
    if route is not None:
        return str(route.path)
    for candidate in leaf_routes(routes):
        if candidate.matches(scope)[0] == Match.FULL:
            return str(getattr(candidate, "path", "unmatched"))
    return "unmatched"


def _milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


class RequestObserver:
    def __init__(
        self, app: ASGIApp, *, routes: list[BaseRoute], metrics: ServerMetrics, max_request_bytes: int
    ) -> None:
        self.app = app
        self.routes = routes
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        offered = _header(scope, b"x-request-id")
        request_id = offered if offered and REQUEST_ID.match(offered) else uuid.uuid4().hex
        record = RequestRecord(request_id)
        scope.setdefault("state", {})["record"] = record
        status = {"code": 500}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
                scored = record.scored
                if scored is not None:
                    headers["x-compute-tokens"] = str(scored.token_count)
                    headers["x-tokenization-time"] = _milliseconds(scored.tokenization_seconds)
                    headers["x-queue-time"] = _milliseconds(scored.queue_seconds)
                    headers["x-inference-time"] = _milliseconds(scored.inference_seconds)
                headers["x-total-time"] = _milliseconds(time.perf_counter() - started)
            await send(message)

        try:
            body, complete = await self._read_body(receive)
            if not complete:
                too_large = APIError(
                    413,
                    f"body: larger than {self.max_request_bytes} bytes (--max-request-bytes)",
                    ErrorType.REQUEST_TOO_LARGE,
                    "body",
                )
                await self._reply(scope, too_large, body, send_with_headers)
                return
            await self.app(scope, self._replay(body, receive), send_with_headers)
        finally:
            self._record(scope, record, status["code"], time.perf_counter() - started)

    async def _read_body(self, receive: Receive) -> tuple[bytes, bool]:
        """The whole body and True; or, once it passes the limit, what came within it and False (the rest is
        not read)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return b"".join(chunks), False
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), True

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        """The body once, then the client's own messages (a disconnect reaches the route)."""
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    async def _reply(self, scope: Scope, error: APIError, body_start: bytes, send: Send) -> None:
        content = json.dumps(error_body_for(scope, self.routes, error, body_start)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(content)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})

    def _record(self, scope: Scope, record: RequestRecord, status: int, seconds: float) -> None:
        route = _route_path(scope, self.routes)
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.request_seconds.labels(route).observe(seconds)
        scored = record.scored
        entry: dict[str, Any] = {
            "request_id": record.request_id,
            "method": scope.get("method"),
            "route": route,
            "status": status,
            "total_ms": round(seconds * 1000, 1),
        }
        if scored is not None:
            entry |= {
                "model": record.model,
                "pairs": scored.pair_count,
                "tokens": scored.token_count,
                "queue_ms": round(scored.queue_seconds * 1000, 1),
                "compute_ms": round(scored.inference_seconds * 1000, 1),
            }
        access_log.info("request", extra={"fields": entry})
