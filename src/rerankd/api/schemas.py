"""Request and response bodies of the native `/rerank` route. The schema is what validation enforces."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

EXAMPLE_REQUEST = {
    "model": "mixedbread-ai/mxbai-rerank-base-v1",
    "query": "Who wrote To Kill a Mockingbird?",
    "documents": [
        "To Kill a Mockingbird is a novel by Harper Lee.",
        "Moby-Dick was written by Herman Melville.",
        "Jane Austen wrote Pride and Prejudice.",
    ],
}


class RerankRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_REQUEST]})

    model: StrictStr | None = Field(None, description="Served model name; the default model when omitted.")
    query: StrictStr = Field(description="The search query (not blank).")
    documents: list[StrictStr] = Field(
        min_length=1, description="Candidate texts to score against the query."
    )
    top_n: StrictInt | None = Field(None, ge=1, description="Return only the n best results.")
    return_documents: StrictBool = Field(False, description="Echo each document's text in its result.")
    raw_scores: StrictBool = Field(False, description="Return the model's logit instead of sigmoid(logit).")

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, query: str) -> str:
        if not query.strip():
            raise ValueError("must not be blank")
        return query


class DocumentText(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: DocumentText | None = None


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage


class ModelInfo(BaseModel):
    name: str
    backend: str
    device: str
    dtype: str
    max_length: int
    max_batch_tokens: int
    untrained: bool = Field(description="random weights: scores carry no meaning")


class ServerInfo(BaseModel):
    version: str
    max_documents: int
    models: list[ModelInfo]
