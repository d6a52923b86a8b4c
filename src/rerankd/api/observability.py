"""Per-request plumbing around the app: request ids, timing headers, metrics and one structured log line per
request (never a body or a document).

A plain ASGI middleware (not `BaseHTTPMiddleware`), so the route still sees the client's disconnect.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rerankd.api.errors import leaf_routes
from rerankd.api.state import RequestRecord
from rerankd.metrics import ServerMetrics

access_log = logging.getLogger("rerankd.access")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
CLIENT_CLOSED = 499  # nginx's status for a client that went away before its answer


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
    def __init__(self, app: ASGIApp, *, routes: list[BaseRoute], metrics: ServerMetrics) -> None:
        self.app = app
        self.routes = routes
        self.metrics = metrics

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
            await self.app(scope, receive, send_with_headers)
        finally:
            if record.client_gone:
                status["code"] = CLIENT_CLOSED
            self._record(scope, record, status["code"], time.perf_counter() - started)

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
