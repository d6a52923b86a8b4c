"""Antfly Inference's rerank API: `POST /ai/v1/rerank` with `documents` (or the older `prompts`), answering
every score in input order as `rerank.score` objects."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from rerankd.api.errors import ERROR_RESPONSES, APIError, dialect_route
from rerankd.api.schemas import EXAMPLE_REQUEST, ModelName, QueryText, Usage
from rerankd.api.security import require_api_key
from rerankd.api.service import RerankCall, run_rerank


def antfly_error(error: APIError) -> dict[str, Any]:
    return {"error": error.message}


router = APIRouter(route_class=dialect_route(antfly_error), dependencies=[Depends(require_api_key)])


class AntflyRerankRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_REQUEST]})

    model: ModelName = None
    query: QueryText
    documents: list[StrictStr] | None = Field(None, min_length=1, description="Texts to score.")
    prompts: list[StrictStr] | None = Field(None, min_length=1, description="Older name of `documents`.")

    @model_validator(mode="after")
    def _one_of_documents_or_prompts(self) -> AntflyRerankRequest:
        if (self.documents is None) == (self.prompts is None):
            which = "both were sent" if self.documents is not None else "neither was sent"
            raise ValueError(f"send documents or prompts (the older name), not both; {which}")
        return self

    @property
    def texts(self) -> list[str]:
        return self.documents if self.documents is not None else self.prompts or []


class RerankScore(BaseModel):
    object: Literal["rerank.score"] = "rerank.score"
    index: int
    score: float


class AntflyRerankResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[RerankScore]
    model: str
    usage: Usage


@router.post(
    "/ai/v1/rerank",
    response_model=AntflyRerankResponse,
    responses=ERROR_RESPONSES,
    summary="Score documents in input order (Antfly Inference)",
)
async def rerank_antfly(body: AntflyRerankRequest, request: Request) -> AntflyRerankResponse:
    field = "documents" if body.documents is not None else "prompts"
    outcome = await run_rerank(
        request, RerankCall(query=body.query, texts=body.texts, model=body.model, documents_field=field)
    )
    in_input_order = sorted(outcome.results, key=lambda item: item.index)
    return AntflyRerankResponse(
        data=[RerankScore(index=item.index, score=item.score) for item in in_input_order],
        model=outcome.model,
        usage=Usage.of(outcome.token_count),
    )
