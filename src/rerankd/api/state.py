"""What the app and each request carry, typed: the app's models, settings and metrics, and what a request's
route learned for the middleware that times and logs it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request

from rerankd.engine.engine import ScoredDocuments
from rerankd.engine.models import ServedModels
from rerankd.metrics import ServerMetrics
from rerankd.settings import ServeSettings

if TYPE_CHECKING:
    from rerankd.api.errors import ErrorShape


class Shutdown:
    """The server's stop, as the app sees it: `begin` (from the signal handler) starts the grace in-flight
    requests get; once it has run out, `expired` returns, and each request still running answers 503 in its
    route's shape instead of being cut off by the server."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expired: asyncio.Event | None = None
        self._begun = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the loop that serves requests (the app's startup does)."""
        self._loop, self._expired = loop, asyncio.Event()

    @property
    def begun(self) -> bool:
        return self._begun

    def begin(self, grace_seconds: float) -> None:
        """Start the grace; safe from a signal handler or another thread, and idempotent."""
        if self._begun or self._loop is None or self._loop.is_closed():
            return
        self._begun = True
        expired = self._expired
        assert expired is not None
        self._loop.call_soon_threadsafe(lambda: self._loop.call_later(grace_seconds, expired.set))  # type: ignore[union-attr]

    async def expired(self) -> None:
        """Return once the grace has run out (never, unless the server is stopping)."""
        if self._expired is None:
            self.bind(asyncio.get_running_loop())
        assert self._expired is not None
        await self._expired.wait()


@dataclass(frozen=True)
class AppState:
    models: ServedModels
    settings: ServeSettings
    metrics: ServerMetrics
    started: int  # Unix time the app was made: the models' `created` in OpenAI-style lists
    shutdown: Shutdown = field(default_factory=Shutdown)


@dataclass
class RequestRecord:
    """Set by the middleware (`request_id`) and filled in by the route: the response headers and the access
    log line read it."""

    request_id: str
    model: str | None = None  # the served name that scored the request
    scored: ScoredDocuments | None = None
    error_shape: ErrorShape | None = None  # a dialect's, once the route knows it
    deadline: float | None = None  # `time.perf_counter()` by which the request must be answered (504 after)
    client_gone: bool = False  # the client disconnected before the request could be answered


def attach_state(app: FastAPI, state: AppState) -> None:
    app.state.rerankd = state


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.rerankd
    return state


def record_of(request: Request) -> RequestRecord | None:
    """The request's record; None outside the middleware (it makes one for every HTTP request)."""
    return getattr(request.state, "record", None)
