"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from rerankd import __version__
from rerankd.api.dialects import antfly, cohere, mixedbread
from rerankd.api.errors import install_error_handlers
from rerankd.api.intake import RequestIntake
from rerankd.api.observability import RequestObserver
from rerankd.api.routes import router
from rerankd.api.state import AppState, attach_state
from rerankd.engine.models import EngineLoader, ServedModels
from rerankd.metrics import ServerMetrics
from rerankd.settings import ServeSettings


def create_app(
    models: ServedModels,
    settings: ServeSettings | None = None,
    *,
    loader: EngineLoader | None = None,
    metrics: ServerMetrics | None = None,
    on_no_model: Callable[[], None] | None = None,
) -> FastAPI:
    """An app serving `models`. Models still to load are loaded by `loader` in a background thread once the
    app starts (so `/health` and `/ready` answer meanwhile); `on_no_model` runs if every one of them failed.
    Engines are closed when the app shuts down. The HTTP limits, security and warm-up come from `settings`."""
    settings = settings or ServeSettings()
    metrics = metrics or ServerMetrics()
    state = AppState(models, settings, metrics, started=int(time.time()))

    def load_models() -> None:
        assert loader is not None
        models.load_all(loader, warmup=settings.warmup)
        if on_no_model is not None and not models.engines():
            on_no_model()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.shutdown.bind(asyncio.get_running_loop())
        if loader is not None:
            threading.Thread(target=load_models, name="model-loader", daemon=True).start()
        yield
        models.close()

    app = FastAPI(
        title="rerankd",
        version=__version__,
        description="Rerank inference server for cross-encoder rerankers. Speaks rerankd's own `/rerank`, "
        "TEI's (`/rerank` with `texts`), Cohere v1 and v2 (`/v1/rerank`, `/v2/rerank`; also Jina, vLLM and "
        "llama.cpp clients), Mixedbread (`/v1/reranking`) and Antfly Inference (`/ai/v1/rerank`), all on one "
        "engine.",
        lifespan=lifespan,
    )
    attach_state(app, state)
    install_error_handlers(app)
    for dialect_router in (router, cohere.v1_router, cohere.v2_router, mixedbread.router, antfly.router):
        app.include_router(dialect_router)
    if settings.cors_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origin),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "X-Total-Time", "X-Inference-Time", "X-Queue-Time"],
        )
    # Added last, runs first: the observer times and logs everything the intake refuses or lets through.
    app.add_middleware(RequestIntake, routes=app.router.routes, settings=settings, shutdown=state.shutdown)
    app.add_middleware(RequestObserver, routes=app.router.routes, metrics=metrics)
    return app
