"""rerankd's own routes: `/rerank` (which also answers TEI's `{query, texts}` and infinity_client), `/health`
and `/info`."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import Discriminator, Tag

from rerankd import __version__
from rerankd.api.dialects.infinity import INFINITY_DEFAULT_MODEL, InfinityRerankResponse, infinity_response
from rerankd.api.dialects.tei import (
    TEIRankResult,
    TEIRerankRequest,
    is_tei_body,
    rerank_tei,
    starts_tei_body,
    tei_error,
)
from rerankd.api.errors import (
    ERROR_RESPONSES,
    RETRY_AFTER_SECONDS,
    APIError,
    DialectRoute,
    ErrorShape,
    native_error,
)
from rerankd.api.schemas import (
    ChunkInfo,
    DocumentText,
    ModelCard,
    ModelInfo,
    ModelList,
    Readiness,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ServerInfo,
    Usage,
)
from rerankd.api.security import bearer, check_api_key, require_api_key
from rerankd.api.service import RerankCall, chunk_options, run_rerank, settings_of
from rerankd.api.state import app_state
from rerankd.engine.models import ModelSlot, ServedModels
from rerankd.engine.tokenize import PairOptions


class NativeRoute(DialectRoute):
    """`/rerank` speaks TEI's error shape to TEI's requests."""

    def error_shape_for(self, body: Any) -> ErrorShape:
        return tei_error if is_tei_body(body) else native_error

    def error_shape_for_start(self, body_start: bytes) -> ErrorShape:
        return tei_error if starts_tei_body(body_start) else native_error


router = APIRouter(route_class=NativeRoute)
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {401: ERROR_RESPONSES[401]}

RerankBody = Annotated[
    Annotated[RerankRequest, Tag("rerankd request")] | Annotated[TEIRerankRequest, Tag("tei request")],
    Discriminator(lambda body: "tei request" if is_tei_body(body) else "rerankd request"),
    Body(),
]


def _model_info(slot: ModelSlot) -> ModelInfo:
    engine = slot.engine
    if engine is None:
        return ModelInfo(name=slot.name, state=slot.state, error=slot.error)
    return ModelInfo(
        name=slot.name,
        state=slot.state,
        backend=engine.info.backend,
        family=engine.info.family,
        device=engine.info.device,
        dtype=engine.info.dtype,
        max_length=engine.max_length,
        max_batch_tokens=engine.settings.batch_tokens,
        untrained=engine.info.untrained,
        load_seconds=slot.load_seconds,
    )


def _served(request: Request) -> ServedModels:
    return app_state(request).models


@router.get("/health", summary="Liveness: the process is up")
async def health() -> dict[str, str]:
    return {"status": "ok"}


async def _holds_key(request: Request) -> bool:
    """Whether the request may see what only key holders see (every request, when the server has no keys).
    Read in the route, not as a dependency, so that `/ready` stays open to probes, and documented as open."""
    try:
        check_api_key(request, await bearer(request))
    except APIError:
        return False
    return True


@router.get(
    "/ready",
    summary="Readiness: whether to send this server traffic",
    description="200 when every model serves (`ready`), or when every model has finished loading and the "
    "ones that failed to load, for good until a restart, are set aside (`degraded`). 503 with `Retry-After` "
    "while a model loads or a loaded model's backend reports a problem; 503 without it when no model serves. "
    "Without a key, on a server with keys, the answer holds `status` alone.",
    responses={
        200: {"model": Readiness, "description": "ready, or degraded"},
        503: {"model": Readiness, "description": "models still loading, unhealthy, or none serving"},
    },
)
async def ready(request: Request) -> JSONResponse:
    readiness = _served(request).readiness()
    body = Readiness(status=readiness.status)
    if await _holds_key(request):
        body = Readiness(
            status=readiness.status,
            ready=readiness.serving,
            pending=readiness.pending,
            failed=readiness.failed,
        )
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if readiness.may_change else None
    status_code = 200 if readiness.takes_traffic else 503
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status_code, headers=headers)


@router.get(
    "/metrics", summary="Prometheus metrics", response_class=PlainTextResponse, responses=AUTH_RESPONSES
)
async def metrics(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> PlainTextResponse:
    if settings_of(request).metrics_auth:
        check_api_key(request, credentials)
    text = app_state(request).metrics.render(_served(request))
    return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/info",
    summary="Version, served models and limits",
    dependencies=[Depends(require_api_key)],
    responses=AUTH_RESPONSES,
)
async def info(request: Request) -> ServerInfo:
    return ServerInfo(
        version=__version__,
        max_documents=settings_of(request).max_documents,
        models=[_model_info(slot) for slot in _served(request).slots()],
    )


@router.get(
    "/models",
    summary="Served models and how each runs",
    dependencies=[Depends(require_api_key)],
    responses=AUTH_RESPONSES,
)
async def models(request: Request) -> list[ModelInfo]:
    return [_model_info(slot) for slot in _served(request).slots()]


@router.get(
    "/v1/models",
    summary="Served models (OpenAI's list)",
    dependencies=[Depends(require_api_key)],
    responses=AUTH_RESPONSES,
)
async def openai_models(request: Request) -> ModelList:
    created = app_state(request).started
    return ModelList(data=[ModelCard(id=name, created=created) for name in _served(request).names()])


@router.post(
    "/rerank",
    response_model=RerankResponse | list[TEIRankResult] | InfinityRerankResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    summary="Rerank documents (rerankd's own; TEI's when the body has `texts`)",
    dependencies=[Depends(require_api_key)],
    description="Scores every document against the query and returns them best first. A body with `texts` "
    "instead of `documents` is TEI's request and gets TEI's answer, a bare sorted list. Requests naming "
    f"Infinity's placeholder model `{INFINITY_DEFAULT_MODEL}` (infinity_client's default) get Infinity's "
    "answer, with each document as a plain string.",
)
async def rerank(
    body: RerankBody, request: Request
) -> RerankResponse | list[TEIRankResult] | InfinityRerankResponse:
    if isinstance(body, TEIRerankRequest):
        return await rerank_tei(request, body)
    infinity = body.model == INFINITY_DEFAULT_MODEL
    if body.long_documents == "chunk":
        options = chunk_options(request, body.max_chunks_per_doc, body.chunk_overlap, "max_chunks_per_doc")
    else:
        options = PairOptions()
    call = RerankCall(
        query=body.query,
        texts=body.documents,
        model=None if infinity else body.model,
        top_n=body.top_n,
        raw_scores=body.raw_scores,
        options=replace(options, instruction=body.instruction),
    )
    outcome = await run_rerank(request, call)
    if infinity:
        return infinity_response(outcome, body.documents, body.return_documents)
    results = [
        RerankResult(
            index=item.index,
            relevance_score=item.score,
            document=DocumentText(text=body.documents[item.index]) if body.return_documents else None,
            chunk=ChunkInfo.of(item.detail) if options.chunk else None,
        )
        for item in outcome.results
    ]
    return RerankResponse(
        id=outcome.id,
        model=outcome.model,
        results=results,
        usage=Usage.of(outcome.token_count),
        query_truncated=True if outcome.query_truncated else None,
    )
