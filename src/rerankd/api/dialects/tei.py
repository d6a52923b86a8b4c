"""Text Embeddings Inference: `POST /rerank` with `texts` answers a bare list sorted by score.

LlamaIndex's TEI reranker and TEI's own clients send `{query, texts}` and expect one result per text; errors
are `{"error", "error_type"}` with TEI's status codes (413 for input over the limits, 429 when overloaded).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from rerankd.api.errors import APIError, ErrorType
from rerankd.api.schemas import ModelName, QueryText, RawScores
from rerankd.api.service import RerankCall, run_rerank
from rerankd.api.state import record_of
from rerankd.engine.tokenize import PairOptions

ERROR_TYPES = {
    ErrorType.OVERLOADED: "Overloaded",
    ErrorType.INTERNAL_ERROR: "Backend",
    ErrorType.UNAVAILABLE: "Unhealthy",
}


def tei_error(error: APIError) -> dict[str, Any]:
    return {"error": error.message, "error_type": ERROR_TYPES.get(error.error_type, "Validation")}


def is_tei_body(body: Any) -> bool:
    """TEI's request is told apart from rerankd's own by its `texts` field."""
    return isinstance(body, dict) and "texts" in body


# A `texts` key in raw JSON: inside a JSON string its quotes would be escaped.
TEXTS_KEY = re.compile(rb'"texts"\s*:')


def starts_tei_body(body_start: bytes) -> bool:
    """Whether the first bytes of a body too large to parse are a TEI request's: its `texts` key comes before
    the texts themselves, which are what makes a body large."""
    return TEXTS_KEY.search(body_start) is not None


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class TEIRerankRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"query": "What is Deep Learning?", "texts": ["Deep Learning is...", "hello"]}]
        }
    )

    query: QueryText
    texts: list[StrictStr] = Field(min_length=1, description="Texts to score against the query.")
    return_text: StrictBool = Field(False, description="Echo each text in its result.")
    raw_scores: RawScores = False
    truncate: StrictBool | None = Field(
        None, description="false: a pair over the model's limit is refused with 413 (default: truncate)."
    )
    truncation_direction: Annotated[Literal["right", "left"], BeforeValidator(_lower)] = Field(
        "right", description="Which end of a long text is cut: right keeps its start, left its end."
    )
    model: ModelName = None

    @model_validator(mode="before")
    @classmethod
    def _no_documents_beside_texts(cls, body: Any) -> Any:
        """A body with `texts` is TEI's, which has no `documents`: ignoring them would score other documents
        than the client meant. Raised as a ValidationError so that the error's location is `documents`."""
        if isinstance(body, dict) and "documents" in body:
            problem = PydanticCustomError(
                "documents_beside_texts",
                "TEI's request (with `texts`) takes no `documents`; send `texts` or `documents`, not both",
            )
            error = InitErrorDetails(type=problem, loc=("documents",), input=body["documents"])
            raise ValidationError.from_exception_data(cls.__name__, [error])
        return body


class TEIRankResult(BaseModel):
    index: int
    score: float
    text: str | None = None


async def rerank_tei(request: Request, body: TEIRerankRequest) -> list[TEIRankResult]:
    record = record_of(request)
    if record is not None:
        record.error_shape = tei_error
    options = PairOptions(truncate=body.truncate is not False, truncation_direction=body.truncation_direction)
    call = RerankCall(
        query=body.query,
        texts=body.texts,
        model=body.model,
        raw_scores=body.raw_scores,
        options=options,
        documents_field="texts",
    )
    outcome = await run_rerank(request, call)
    return [
        TEIRankResult(
            index=item.index, score=item.score, text=body.texts[item.index] if body.return_text else None
        )
        for item in outcome.results
    ]
