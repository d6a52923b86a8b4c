"""The one rerank path every dialect calls: limits, model lookup, scoring, ranking.

Dialect modules only translate their request into a `RerankCall` and the `RerankOutcome` into their
response, so every route scores the same pairs the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

from fastapi import Request

from rerankd.api.documents import is_valid_text
from rerankd.api.errors import APIError
from rerankd.engine.engine import DocumentScore, ScoredDocuments
from rerankd.engine.models import ModelNotReadyError, ServedModels, UnknownModelError
from rerankd.engine.postprocess import rank
from rerankd.engine.scheduler import QueueFullError
from rerankd.engine.tokenize import DEFAULT_CHUNK_OVERLAP, InputTooLongError, PairOptions


@dataclass(frozen=True)
class APISettings:
    max_documents: int = 1000
    max_document_chars: int = 100_000  # per document and for the query
    max_request_bytes: int = 16 * 1024 * 1024
    max_chunks_per_doc: int = 64  # windows per document in chunk mode, at most
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP  # tokens, when a request sets none
    request_timeout: float | None = None  # seconds
    api_keys: tuple[str, ...] = ()  # none: no authentication
    metrics_auth: bool = False
    cors_origins: tuple[str, ...] = ()
    log_format: str = "json"


@dataclass(frozen=True)
class RerankCall:
    query: str
    texts: Sequence[str]
    model: str | None = None
    top_n: int | None = None
    raw_scores: bool = False
    options: PairOptions = field(default_factory=PairOptions)
    documents_field: str = "documents"  # what the dialect calls its documents, for error messages


@dataclass(frozen=True)
class RankedText:
    index: int
    score: float
    detail: DocumentScore


@dataclass(frozen=True)
class RerankOutcome:
    model: str
    results: list[RankedText]  # best first, cut to top_n
    token_count: int
    pair_count: int
    query_truncated: bool


def settings_of(request: Request) -> APISettings:
    return request.app.state.settings


def chunk_options(
    request: Request, max_chunks_per_doc: int | None, chunk_overlap: int | None, field_name: str
) -> PairOptions:
    """Chunk-mode options within the server's limits (a request asking for more windows is refused)."""
    settings = settings_of(request)
    limit = settings.max_chunks_per_doc
    if max_chunks_per_doc is not None and max_chunks_per_doc > limit:
        raise APIError(
            422,
            f"{field_name}: {max_chunks_per_doc} exceeds this server's limit of {limit} "
            "(--max-chunks-per-doc)",
            "invalid_request",
            field_name,
        )
    return PairOptions(
        chunk=True,
        max_chunks_per_doc=max_chunks_per_doc or limit,
        chunk_overlap=settings.chunk_overlap if chunk_overlap is None else chunk_overlap,
    )


def _check_sizes(call: RerankCall, settings: APISettings) -> None:
    where = call.documents_field
    if len(call.texts) > settings.max_documents:
        raise APIError(
            413,
            f"{where}: {len(call.texts)} documents exceed the limit of {settings.max_documents} "
            "(--max-documents)",
            "too_many_documents",
            where,
        )
    limit = settings.max_document_chars
    texts = [("query", call.query), *((f"{where}.{index}", text) for index, text in enumerate(call.texts))]
    for field_name, text in texts:
        if len(text) > limit:
            message = (
                f"{field_name}: {len(text)} characters exceed the limit of {limit} (--max-document-chars)"
            )
            raise APIError(413, message, "too_long", field_name)
        if not is_valid_text(text):
            message = f"{field_name}: contains a lone surrogate (invalid Unicode)"
            raise APIError(422, message, "invalid_request", field_name)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, scoring: Awaitable[ScoredDocuments]) -> ScoredDocuments:
    """Score, but stop (dropping the request's queued pairs) if the client goes away first."""
    task = asyncio.ensure_future(scoring)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this coroutine is cancelled (--request-timeout): the scoring must stop too
        watcher.cancel()
        disconnected = not task.done()
        if disconnected:
            task.cancel()
    if disconnected:
        raise APIError(499, "client closed the request", "client_closed")
    return task.result()


async def run_rerank(request: Request, call: RerankCall) -> RerankOutcome:
    models: ServedModels = request.app.state.models
    settings = settings_of(request)
    _check_sizes(call, settings)
    try:
        engine = models.get(call.model)
    except UnknownModelError as error:
        raise APIError(404, str(error), "model_not_found", "model") from error
    except ModelNotReadyError as error:
        raise APIError(503, str(error), "unavailable", "model") from error
    where = call.documents_field
    try:
        scoring = engine.score(call.query, call.texts, call.options)
        scored = await asyncio.wait_for(_unless_disconnected(request, scoring), settings.request_timeout)
    except TimeoutError as error:
        message = (
            f"the request took longer than {settings.request_timeout:g} s (--request-timeout); "
            "its queued work was dropped"
        )
        raise APIError(504, message, "timeout") from error
    except InputTooLongError as error:
        param = f"{where}.{error.index}"
        raise APIError(413, f"{param}: {error}", "input_too_long", param) from error
    except QueueFullError as error:
        raise APIError(429, str(error), "overloaded") from error
    request.state.model = engine.name
    request.state.scored = scored
    ranked = rank(scored.logits, raw_scores=call.raw_scores, top_n=call.top_n)
    return RerankOutcome(
        model=engine.name,
        results=[RankedText(item.index, item.score, scored.documents[item.index]) for item in ranked],
        token_count=scored.token_count,
        pair_count=scored.pair_count,
        query_truncated=scored.query_truncated,
    )
