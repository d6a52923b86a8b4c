"""Cohere's rerank API: `POST /v1/rerank` (also what Jina, vLLM, llama.cpp and Infinity clients post there)
and `POST /v2/rerank`.

v1 takes strings or objects (`rank_fields`) and chunks long documents when `max_chunks_per_doc` is set, as
Cohere does; v2 takes strings, requires `model` and truncates each document to `max_tokens_per_doc`. Errors
carry `message` (Cohere's clients) and, on v1, `detail` too (Jina's clients).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from rerankd.api.documents import document_texts
from rerankd.api.errors import ERROR_RESPONSES, APIError, dialect_route
from rerankd.api.schemas import (
    EXAMPLE_REQUEST,
    ChunkInfo,
    MaxChunksPerDoc,
    ModelName,
    ObjectDocument,
    QueryText,
    RankFields,
    RawScores,
    TopN,
)
from rerankd.api.security import require_api_key
from rerankd.api.service import RerankCall, RerankOutcome, chunk_options, run_rerank
from rerankd.engine.tokenize import PairOptions


def cohere_v1_error(error: APIError) -> dict[str, Any]:
    return {"message": error.message, "detail": error.message}


def cohere_v2_error(error: APIError) -> dict[str, Any]:
    return {"message": error.message}


v1_router = APIRouter(route_class=dialect_route(cohere_v1_error), dependencies=[Depends(require_api_key)])
v2_router = APIRouter(route_class=dialect_route(cohere_v2_error), dependencies=[Depends(require_api_key)])


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    search_units: int


class Meta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits
    warnings: list[str] | None = None

    @classmethod
    def of(cls, version: str, outcome: RerankOutcome) -> Meta:
        warnings = ["the query was truncated to fit the model's limit"] if outcome.query_truncated else None
        return cls(
            api_version=ApiVersion(version=version),
            billed_units=BilledUnits(search_units=1),
            warnings=warnings,
        )


class V1Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CohereV1Request(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {**EXAMPLE_REQUEST, "top_n": 2, "return_documents": True},
                {
                    "query": "Who wrote To Kill a Mockingbird?",
                    "documents": [{"title": "Mockingbird", "text": "A novel by Harper Lee."}],
                    "rank_fields": ["title", "text"],
                    "max_chunks_per_doc": 10,
                },
            ]
        }
    )

    model: ModelName = None
    query: QueryText
    documents: list[ObjectDocument] = Field(
        min_length=1, description="Strings, or objects scored by their `rank_fields`."
    )
    top_n: TopN = None
    return_documents: StrictBool = Field(
        False, description="Return each document: a string as `{text}`, an object as sent."
    )
    rank_fields: RankFields = None
    max_chunks_per_doc: MaxChunksPerDoc = None
    raw_scores: RawScores = False


class V1Result(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = None
    chunk: ChunkInfo | None = None


class CohereV1Response(BaseModel):
    id: str
    model: str
    results: list[V1Result]
    usage: V1Usage
    meta: Meta


@v1_router.post(
    "/v1/rerank",
    response_model=CohereV1Response,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    summary="Rerank documents (Cohere v1; also Jina, vLLM, llama.cpp and Infinity clients)",
)
async def rerank_v1(body: CohereV1Request, request: Request) -> CohereV1Response:
    texts = document_texts(body.documents, body.rank_fields, "documents")
    if body.max_chunks_per_doc is not None:
        options = chunk_options(request, body.max_chunks_per_doc, None, "max_chunks_per_doc")
    else:
        options = PairOptions()
    call = RerankCall(
        query=body.query,
        texts=texts,
        model=body.model,
        top_n=body.top_n,
        raw_scores=body.raw_scores,
        options=options,
    )
    outcome = await run_rerank(request, call)

    def returned(index: int) -> dict[str, Any] | None:
        if not body.return_documents:
            return None
        document = body.documents[index]
        return {"text": document} if isinstance(document, str) else document

    return CohereV1Response(
        id=outcome.id,
        model=outcome.model,
        results=[
            V1Result(
                index=item.index,
                relevance_score=item.score,
                document=returned(item.index),
                chunk=ChunkInfo.of(item.detail) if options.chunk else None,
            )
            for item in outcome.results
        ],
        usage=V1Usage(prompt_tokens=outcome.token_count, total_tokens=outcome.token_count),
        meta=Meta.of("1", outcome),
    )


class CohereV2Request(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{**EXAMPLE_REQUEST, "top_n": 2}]})

    model: StrictStr = Field(description="Served model name (required by Cohere's v2 API).")
    query: QueryText
    documents: list[StrictStr] = Field(
        min_length=1, description="Candidate texts to score against the query."
    )
    top_n: TopN = None
    max_tokens_per_doc: StrictInt | None = Field(
        None,
        ge=1,
        description="Truncate each document to this many tokens first (then to the model's limit).",
    )


class V2Result(BaseModel):
    index: int
    relevance_score: float


class CohereV2Response(BaseModel):
    id: str
    results: list[V2Result]
    meta: Meta


@v2_router.post(
    "/v2/rerank",
    response_model=CohereV2Response,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    summary="Rerank documents (Cohere v2)",
)
async def rerank_v2(body: CohereV2Request, request: Request) -> CohereV2Response:
    call = RerankCall(
        query=body.query,
        texts=body.documents,
        model=body.model,
        top_n=body.top_n,
        options=PairOptions(max_tokens_per_doc=body.max_tokens_per_doc),
    )
    outcome = await run_rerank(request, call)
    return CohereV2Response(
        id=outcome.id,
        results=[V2Result(index=item.index, relevance_score=item.score) for item in outcome.results],
        meta=Meta.of("2", outcome),
    )
