"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from rerankd import __version__
from rerankd.api.errors import install_error_handlers
from rerankd.api.routes import router
from rerankd.engine.models import ServedModels


@dataclass(frozen=True)
class APISettings:
    max_documents: int = 1000


def create_app(models: ServedModels, settings: APISettings = APISettings()) -> FastAPI:
    """An app serving the already-loaded `models`; their engines are closed when the app shuts down."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        models.close()

    app = FastAPI(
        title="rerankd",
        version=__version__,
        description="Rerank inference server for cross-encoder rerankers.",
        lifespan=lifespan,
    )
    app.state.models = models
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    return app
