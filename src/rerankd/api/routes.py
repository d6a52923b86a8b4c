"""HTTP routes: translate requests into engine calls and engine results into responses."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request

from rerankd import __version__
from rerankd.api.errors import APIError
from rerankd.api.schemas import (
    DocumentText,
    ModelInfo,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ServerInfo,
    Usage,
)
from rerankd.engine.models import ServedModels, UnknownModelError
from rerankd.engine.postprocess import rank

router = APIRouter()

ERROR_RESPONSES = {
    400: {"description": "Malformed JSON"},
    404: {"description": "Unknown model"},
    413: {"description": "Too many documents"},
    422: {"description": "Invalid field"},
}


@router.get("/health", summary="Liveness: the process is up")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/info", summary="Version, served models and limits")
async def info(request: Request) -> ServerInfo:
    models: ServedModels = request.app.state.models
    return ServerInfo(
        version=__version__,
        max_documents=request.app.state.settings.max_documents,
        models=[
            ModelInfo(
                name=engine.name,
                backend=engine.info.backend,
                device=engine.info.device,
                dtype=engine.info.dtype,
                max_length=engine.limits.max_length,
                max_batch_tokens=engine.limits.batching.max_batch_tokens or 0,
                untrained=engine.info.untrained,
            )
            for engine in models.engines()
        ],
    )


@router.post(
    "/rerank",
    response_model=RerankResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    summary="Rerank documents",
)
async def rerank(body: RerankRequest, request: Request) -> RerankResponse:
    models: ServedModels = request.app.state.models
    max_documents: int = request.app.state.settings.max_documents
    if len(body.documents) > max_documents:
        raise APIError(
            413,
            f"documents: {len(body.documents)} documents exceed the limit of {max_documents} "
            "(--max-documents)",
            "too_many_documents",
            "documents",
        )
    try:
        engine = models.get(body.model)
    except UnknownModelError as error:
        raise APIError(404, str(error), "model_not_found", "model") from error

    scored = await engine.score(body.query, body.documents)
    ranked = rank(scored.logits, raw_scores=body.raw_scores, top_n=body.top_n)
    results = [
        RerankResult(
            index=item.index,
            relevance_score=item.score,
            document=DocumentText(text=body.documents[item.index]) if body.return_documents else None,
        )
        for item in ranked
    ]
    return RerankResponse(
        id=f"rerank-{uuid.uuid4().hex}",
        model=engine.name,
        results=results,
        usage=Usage(prompt_tokens=scored.token_count, total_tokens=scored.token_count),
    )
