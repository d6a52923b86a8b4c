"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from rerankd import __version__
from rerankd.api.dialects import antfly, cohere, mixedbread
from rerankd.api.errors import install_error_handlers
from rerankd.api.routes import router
from rerankd.api.service import APISettings
from rerankd.engine.models import ServedModels

__all__ = ["APISettings", "create_app"]


def create_app(models: ServedModels, settings: APISettings | None = None) -> FastAPI:
    """An app serving the already-loaded `models`; their engines are closed when the app shuts down."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
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
    app.state.models = models
    app.state.settings = settings or APISettings()
    install_error_handlers(app)
    for dialect_router in (router, cohere.v1_router, cohere.v2_router, mixedbread.router, antfly.router):
        app.include_router(dialect_router)
    return app
