"""Mixedbread's rerank API, as the `mixedbread` SDK posts it: `POST /v1/reranking` with `input`, `top_k`,
`return_input` and `rank_fields`; results in `data` with `object: "rank_result"`."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from rerankd.api.documents import document_texts
from rerankd.api.errors import ERROR_RESPONSES, APIError, ErrorType, dialect_route
from rerankd.api.schemas import ModelName, ObjectDocument, QueryText, RankFields, Usage
from rerankd.api.security import require_api_key
from rerankd.api.service import RerankCall, run_rerank


def mixedbread_error(error: APIError) -> dict[str, Any]:
    return {"detail": error.message}


router = APIRouter(route_class=dialect_route(mixedbread_error), dependencies=[Depends(require_api_key)])


class MixedbreadRerankRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "mixedbread-ai/mxbai-rerank-base-v1",
                    "query": "Who wrote To Kill a Mockingbird?",
                    "input": ["To Kill a Mockingbird is a novel by Harper Lee.", "Moby-Dick is by Melville."],
                    "top_k": 1,
                    "return_input": True,
                }
            ]
        }
    )

    model: ModelName = None
    query: QueryText
    input: list[ObjectDocument] = Field(
        min_length=1, description="Strings, or objects scored by `rank_fields`."
    )
    rank_fields: RankFields = None
    top_k: StrictInt | None = Field(None, ge=1, description="Return only the k best (default: all).")
    return_input: StrictBool = Field(False, description="Return each input as sent.")
    rewrite_query: StrictBool = Field(False, description="Not supported here: only false is accepted.")


class RankResult(BaseModel):
    index: int
    score: float
    input: Any = None
    object: Literal["rank_result"] = "rank_result"


class MixedbreadRerankResponse(BaseModel):
    model: str
    object: Literal["list"] = "list"
    data: list[RankResult]
    top_k: int
    return_input: bool
    usage: Usage


@router.post(
    "/v1/reranking",
    response_model=MixedbreadRerankResponse,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
    summary="Rerank documents (Mixedbread)",
)
async def rerank_mixedbread(body: MixedbreadRerankRequest, request: Request) -> MixedbreadRerankResponse:
    if body.rewrite_query:
        raise APIError(
            422,
            "rewrite_query: query rewriting is not supported; send false",
            ErrorType.INVALID_REQUEST,
            "rewrite_query",
        )
    texts = document_texts(body.input, body.rank_fields, "input")
    call = RerankCall(
        query=body.query, texts=texts, model=body.model, top_n=body.top_k, documents_field="input"
    )
    outcome = await run_rerank(request, call)
    return MixedbreadRerankResponse(
        model=outcome.model,
        data=[
            RankResult(
                index=item.index,
                score=item.score,
                input=body.input[item.index] if body.return_input else None,
            )
            for item in outcome.results
        ],
        top_k=len(outcome.results),
        return_input=body.return_input,
        usage=Usage.of(outcome.token_count),
    )
