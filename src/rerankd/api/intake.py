"""A request's way in, before any route runs: what can be refused without reading the body is refused first
(a `Content-Length` past `--max-request-bytes`, a missing or wrong API key, more body bytes in flight than
the server takes once it has waited a few seconds for room), then the body is read within its time limits,
and the route runs until the shutdown grace runs out.

A plain ASGI middleware (not `BaseHTTPMiddleware`), so the route still sees the client's disconnect. Refusing
before reading also answers `Expect: 100-continue` uploads before the client sends them: the server only says
`100 Continue` when the app first asks for the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.security.utils import get_authorization_scheme_param
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rerankd.api.errors import APIError, ErrorType, error_body_for, error_headers, leaf_routes
from rerankd.api.security import check_api_key, require_api_key
from rerankd.api.state import RequestRecord, Shutdown
from rerankd.backends.heap import HeapTrimmer
from rerankd.settings import ServeSettings

# Bodies this small are always read: refusing them saves no memory, and they are what normal clients send.
SMALL_BODY_BYTES = 64 * 1024
# How long a body refused from its Content-Length is waited for, to tell its dialect by its first bytes.
FIRST_CHUNK_SECONDS = 1.0
# How long a body waits for room in the bytes in flight before a 503. It is not read meanwhile, so TCP holds
# its client back at no cost; answered at once, clients that resend at once keep the event loop busy with
# refusals (ten of them sending 15 MB bodies made ~115 refusals a second).
ROOM_WAIT_SECONDS = 5.0
# After a body this large is done with, the freed heap goes back to the OS (glibc keeps it otherwise).
LARGE_BODY_BYTES = 1024 * 1024


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value)
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _has_body(scope: Scope, announced: int | None) -> bool:
    """Whether the client sends a body after the headers. One refused unread is not drained (reading and
    discarding 16 MB bodies as fast as clients resend them would take the event loop): the connection is
    closed after the answer, as nginx does past its lingering time."""
    return bool(announced) or _header(scope, b"transfer-encoding") is not None


def _needs_key(route: BaseRoute) -> bool:
    """Whether the route, or a router it is in, depends on `require_api_key`."""
    if not isinstance(route, APIRoute):
        return False
    pending = list(route.dependant.dependencies)
    while pending:
        dependency = pending.pop()
        if dependency.call is require_api_key:
            return True
        pending.extend(dependency.dependencies)
    return False


class BodyBudget:
    """Request-body bytes being read or worked on, over all requests: a bound on the memory that large
    bodies can take at once. A body is admitted while the total stays within the budget, or when it is small,
    or when no other body is in flight (so that any body within --max-request-bytes can get through)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._trimmer = HeapTrimmer()
        self._freed = asyncio.Event()  # set, and replaced, whenever bytes are released

    def admit(self, size: int) -> bool:
        if size > SMALL_BODY_BYTES and self.in_flight and self.in_flight + size > self.limit:
            return False
        self.in_flight += size
        return True

    async def reserve(self, size: int, wait: float) -> bool:
        """`admit`, waiting up to `wait` seconds for other bodies to make room."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not self.admit(size):
            if loop.time() >= deadline:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._freed.wait()
        return True

    def grow(self, size: int) -> None:
        """Count bytes of a body whose length was not announced, as they arrive."""
        self.in_flight += size

    def release(self, size: int) -> None:
        self.in_flight -= size
        self._freed.set()
        self._freed = asyncio.Event()
        if size >= LARGE_BODY_BYTES and self.in_flight == 0:
            self._trimmer.trim()


@dataclass
class _Body:
    """What reading a body gave: its bytes, or why there are none."""

    data: bytes = b""
    refusal: APIError | None = None
    disconnected: bool = False


class RequestIntake:
    def __init__(
        self, app: ASGIApp, *, routes: list[BaseRoute], settings: ServeSettings, shutdown: Shutdown
    ) -> None:
        self.app = app
        self.routes = routes
        self.settings = settings
        self.shutdown = shutdown
        self.keyed_routes = [route for route in leaf_routes(routes) if _needs_key(route)]
        self.budget = BodyBudget(settings.max_body_bytes_in_flight or 4 * settings.max_request_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record: RequestRecord | None = scope.get("state", {}).get("record")
        started = time.perf_counter()
        deadline = started + (self.settings.request_timeout or float("inf"))
        if record is not None:
            record.deadline = deadline
        announced = _content_length(scope)
        refusal = self._refusal_before_body(scope, announced) or await self._room_for(announced)
        if refusal is not None:
            body_start = await self._body_start(scope, receive, refusal)
            await self._reply(scope, refusal, body_start, send, close=_has_body(scope, announced))
            return
        reserved = announced or 0
        try:
            body = await self._read_body(receive, time.perf_counter(), deadline, announced)
            reserved = max(reserved, len(body.data))
            if body.disconnected:
                if record is not None:
                    record.client_gone = True
                return
            if body.refusal is not None:
                await self._reply(scope, body.refusal, body.data, send, close=True)
                return
            await self._run_within_grace(scope, self._replay(body.data, receive), send)
        finally:
            self.budget.release(reserved)

    def _refusal_before_body(self, scope: Scope, announced: int | None) -> APIError | None:
        """413 for an announced body past the limit, 401 for a keyed route without a valid key."""
        limit = self.settings.max_request_bytes
        if announced is not None and announced > limit:
            return _too_large(limit)
        if self.settings.api_key and any(
            route.matches(scope)[0] == Match.FULL for route in self.keyed_routes
        ):
            try:
                check_api_key(Request(scope), _credentials(scope))
            except APIError as error:
                return error
        return None

    async def _room_for(self, announced: int | None) -> APIError | None:
        """None once the announced bytes count as in flight; 503 when no room is made for them in time."""
        if await self.budget.reserve(announced or 0, min(ROOM_WAIT_SECONDS, self.settings.body_timeout)):
            return None
        message = (
            f"server busy: {self.budget.in_flight} bytes of request bodies in flight, and {announced} more "
            f"would pass the limit of {self.budget.limit} (--max-body-bytes-in-flight); retry soon"
        )
        return APIError(503, message, ErrorType.OVERLOADED, "body")

    async def _body_start(self, scope: Scope, receive: Receive, refusal: APIError) -> bytes:
        """For a body refused as too large that the client is already sending, its first chunk: enough to
        tell the dialect whose error shape to answer in (TEI's `texts` come first). A client that waits for
        `100 Continue` is not asked for it."""
        expects = (_header(scope, b"expect") or b"").lower() == b"100-continue"
        if refusal.status != 413 or expects:
            return b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_CHUNK_SECONDS):
                message = await receive()
                return bytes(message.get("body", b""))
        return b""

    async def _read_body(
        self, receive: Receive, started: float, deadline: float, announced: int | None
    ) -> _Body:
        """The whole body, read within `--body-timeout` from `started` (once room was made for it) and the
        request's deadline; a body past the limit is refused once it passes it (the rest is not read); a
        disconnect leaves nothing to answer."""
        chunks: list[bytes] = []
        size = 0
        body_deadline = started + self.settings.body_timeout
        try:
            async with asyncio.timeout_at(_loop_time(min(body_deadline, deadline))):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return _Body(b"".join(chunks), disconnected=True)
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.settings.max_request_bytes:
                        return _Body(b"".join(chunks), _too_large(self.settings.max_request_bytes))
                    if announced is None:
                        self.budget.grow(len(chunk))
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return _Body(b"".join(chunks))
        except TimeoutError:
            if body_deadline <= deadline:
                late = f"body: not received within {self.settings.body_timeout:g} s (--body-timeout)"
                return _Body(b"".join(chunks), APIError(408, late, ErrorType.TIMEOUT, "body"))
            timed_out = (
                f"the request took longer than {self.settings.request_timeout:g} s (--request-timeout) "
                "before its body arrived"
            )
            return _Body(b"".join(chunks), APIError(504, timed_out, ErrorType.TIMEOUT, "body"))

    async def _run_within_grace(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the route; if the server's shutdown grace runs out first, stop it and answer 503 in the route's
        shape (unless its answer has begun), so no client is cut off without a word."""
        responded = False

        async def tracking_send(message: Message) -> None:
            nonlocal responded
            responded = True
            await send(message)

        route = asyncio.ensure_future(self.app(scope, receive, tracking_send))
        expiry = asyncio.ensure_future(self.shutdown.expired())
        try:
            await asyncio.wait({route, expiry}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            expiry.cancel()
            if not route.done():
                route.cancel()
        if route.done() and not route.cancelled():  # a route just cancelled is done only once it has run
            route.result()  # the route's own exception, if any, as if it had been awaited
            return
        with contextlib.suppress(asyncio.CancelledError):
            await route
        if not responded:
            message = "the server is shutting down and this request did not finish within --shutdown-timeout"
            await self._reply(scope, APIError(503, message, ErrorType.UNAVAILABLE), b"", send, close=True)

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

    async def _reply(
        self, scope: Scope, error: APIError, body_start: bytes, send: Send, close: bool = False
    ) -> None:
        """`error` in the shape of the route the request is for; `close` ends the connection after it (a
        client whose body is cut off or late is not read any further)."""
        content = json.dumps(error_body_for(scope, self.routes, error, body_start)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        headers += [(name.lower().encode(), value.encode()) for name, value in error_headers(error).items()]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def _too_large(limit: int) -> APIError:
    message = f"body: larger than {limit} bytes (--max-request-bytes)"
    return APIError(413, message, ErrorType.REQUEST_TOO_LARGE, "body")


def _credentials(scope: Scope) -> HTTPAuthorizationCredentials | None:
    """The bearer credentials as FastAPI's `HTTPBearer` reads them."""
    authorization = _header(scope, b"authorization")
    scheme, credentials = get_authorization_scheme_param(
        authorization.decode("latin-1") if authorization else None
    )
    if not authorization or scheme.lower() != "bearer" or not credentials:
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials)


def _loop_time(deadline: float) -> float:
    """A `time.perf_counter` deadline on the event loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.perf_counter())
