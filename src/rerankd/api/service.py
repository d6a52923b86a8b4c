"""The one rerank path every dialect calls: limits, model lookup, scoring, ranking.

Dialect modules only translate their request into a `RerankCall` and the `RerankOutcome` into their
response, so every route scores the same pairs the same way.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

from fastapi import Request

from rerankd.api.documents import is_valid_text
from rerankd.api.errors import APIError, ErrorType
from rerankd.api.state import RequestRecord, app_state, record_of
from rerankd.engine.engine import NonFiniteScoresError, ScoredDocuments, TooManyPairsError
from rerankd.engine.models import ModelNotReadyError, UnknownModelError
from rerankd.engine.postprocess import RankedDocument, rank
from rerankd.engine.scheduler import QueueFullError
from rerankd.engine.tokenize import InputTooLongError, InstructionNotTakenError, PairOptions
from rerankd.settings import ServeSettings


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
class RerankOutcome:
    id: str  # every dialect's response id: `rerank-` and the request id the logs and X-Request-ID show
    model: str
    results: list[RankedDocument]  # best first, cut to top_n
    token_count: int
    pair_count: int
    query_truncated: bool


def settings_of(request: Request) -> ServeSettings:
    return app_state(request).settings


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
            ErrorType.INVALID_REQUEST,
            field_name,
        )
    return PairOptions(
        chunk=True,
        max_chunks_per_doc=max_chunks_per_doc or limit,
        chunk_overlap=settings.chunk_overlap if chunk_overlap is None else chunk_overlap,
    )


def _check_sizes(call: RerankCall, settings: ServeSettings) -> None:
    where = call.documents_field
    if len(call.texts) > settings.max_documents:
        raise APIError(
            413,
            f"{where}: {len(call.texts)} documents exceed the limit of {settings.max_documents} "
            "(--max-documents)",
            ErrorType.TOO_MANY_DOCUMENTS,
            where,
        )
    limit = settings.max_document_chars
    texts = [("query", call.query), *((f"{where}.{index}", text) for index, text in enumerate(call.texts))]
    if call.options.instruction is not None:
        texts.append(("instruction", call.options.instruction))
    for field_name, text in texts:
        if len(text) > limit:
            message = (
                f"{field_name}: {len(text)} characters exceed the limit of {limit} (--max-document-chars)"
            )
            raise APIError(413, message, ErrorType.TOO_LONG, field_name)
        if not is_valid_text(text):
            message = f"{field_name}: contains a lone surrogate (invalid Unicode)"
            raise APIError(422, message, ErrorType.INVALID_REQUEST, field_name)


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
        raise APIError(499, "client closed the request", ErrorType.CLIENT_CLOSED)
    return task.result()


def _seconds_left(record: RequestRecord | None, settings: ServeSettings) -> float | None:
    """What is left of `--request-timeout`, counted from the request's first byte (the upload's time
    included) where the middleware set its deadline."""
    if record is None or record.deadline is None:
        return settings.request_timeout
    return max(record.deadline - time.perf_counter(), 0.0)


async def run_rerank(request: Request, call: RerankCall) -> RerankOutcome:
    models = app_state(request).models
    settings = settings_of(request)
    _check_sizes(call, settings)
    try:
        engine = models.get(call.model)
    except UnknownModelError as error:
        raise APIError(404, str(error), ErrorType.MODEL_NOT_FOUND, "model") from error
    except ModelNotReadyError as error:
        raise APIError(503, str(error), ErrorType.UNAVAILABLE, "model", retry=not error.permanent) from error
    where = call.documents_field
    record = record_of(request)
    try:
        max_pairs = settings.max_request_pairs or settings.max_documents
        scoring = engine.score(call.query, call.texts, call.options, max_pairs)
        scored = await asyncio.wait_for(
            _unless_disconnected(request, scoring), _seconds_left(record, settings)
        )
    except TimeoutError as error:
        message = (
            f"the request took longer than {settings.request_timeout:g} s (--request-timeout); "
            "its queued work was dropped"
        )
        raise APIError(504, message, ErrorType.TIMEOUT) from error
    except InputTooLongError as error:
        param = f"{where}.{error.index}"
        raise APIError(413, f"{param}: {error}", ErrorType.INPUT_TOO_LONG, param) from error
    except TooManyPairsError as error:
        raise APIError(413, f"{where}: {error}", ErrorType.TOO_MANY_DOCUMENTS, where) from error
    except InstructionNotTakenError as error:
        message = f"instruction: model {engine.name!r} ({engine.info.family}): {error}"
        raise APIError(422, message, ErrorType.INVALID_REQUEST, "instruction") from error
    except QueueFullError as error:
        raise APIError(429, str(error), ErrorType.OVERLOADED) from error
    except NonFiniteScoresError as error:
        raise APIError(500, str(error), ErrorType.INTERNAL_ERROR) from error
    if record is not None:
        record.model, record.scored = engine.name, scored
    request_id = record.request_id if record is not None else uuid.uuid4().hex
    ranked = rank(scored.documents, raw_scores=call.raw_scores, top_n=call.top_n)
    return RerankOutcome(
        id=f"rerank-{request_id}",
        model=engine.name,
        results=ranked,
        token_count=scored.token_count,
        pair_count=scored.pair_count,
        query_truncated=scored.query_truncated,
    )
