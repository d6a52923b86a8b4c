"""What the app and each request carry, typed: the app's models, settings and metrics, and what a request's
route learned for the middleware that times and logs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request

from rerankd.engine.engine import ScoredDocuments
from rerankd.engine.models import ServedModels
from rerankd.metrics import ServerMetrics
from rerankd.settings import ServeSettings

if TYPE_CHECKING:
    from rerankd.api.errors import ErrorShape


@dataclass(frozen=True)
class AppState:
    models: ServedModels
    settings: ServeSettings
    metrics: ServerMetrics
    started: int  # Unix time the app was made: the models' `created` in OpenAI-style lists


@dataclass
class RequestRecord:
    """Set by the middleware (`request_id`) and filled in by the route: the response headers and the access
    log line read it."""

    request_id: str
    model: str | None = None  # the served name that scored the request
    scored: ScoredDocuments | None = None
    error_shape: ErrorShape | None = None  # a dialect's, once the route knows it


def attach_state(app: FastAPI, state: AppState) -> None:
    app.state.rerankd = state


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.rerankd
    return state


def record_of(request: Request) -> RequestRecord | None:
    """The request's record; None outside the middleware (it makes one for every HTTP request)."""
    return getattr(request.state, "record", None)
