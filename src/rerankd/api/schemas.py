"""Request and response bodies of rerankd's own routes, and pieces every dialect shares. The schema is what
validation enforces."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from rerankd.engine.engine import DocumentScore
from rerankd.engine.models import ServingStatus

EXAMPLE_REQUEST: dict[str, Any] = {
    "model": "mixedbread-ai/mxbai-rerank-base-v1",
    "query": "Who wrote To Kill a Mockingbird?",
    "documents": [
        "To Kill a Mockingbird is a novel by Harper Lee.",
        "Moby-Dick was written by Herman Melville.",
        "Jane Austen wrote Pride and Prejudice.",
    ],
}


# Characters that show nothing: controls, format characters (zero-width space and joiners, BOM, bidi marks)
# and unassigned code points (noncharacters included); with whitespace, a query of only these is blank.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cn"})


def is_blank(text: str) -> bool:
    """Whether `text` has no visible character: `str.strip` alone lets a query of zero-width spaces through,
    and such a query gives the model nothing to match."""
    return all(char.isspace() or unicodedata.category(char) in INVISIBLE_CATEGORIES for char in text)


def _not_blank(text: str) -> str:
    if is_blank(text):
        raise ValueError("must not be blank (it has no visible character)")
    return text


QueryText = Annotated[
    StrictStr,
    AfterValidator(_not_blank),
    Field(description="The search query (not blank: at least one visible character)."),
]
ModelName = Annotated[
    StrictStr | None, Field(description="Served model name; the default model when omitted.")
]
TopN = Annotated[StrictInt | None, Field(ge=1, description="Return only the n best results.")]
RawScores = Annotated[StrictBool, Field(description="Return the model's logit instead of sigmoid(logit).")]
# A document as Cohere v1, Jina and Mixedbread clients send it: a string, or an object scored by its
# rank fields.
ObjectDocument = StrictStr | dict[StrictStr, Any]
RankFields = Annotated[
    list[StrictStr] | None,
    Field(
        min_length=1,
        description="Fields of object documents that make the scored text (default: text). One field: its "
        "value; several: `field: value` lines in this order.",
    ),
]
MaxChunksPerDoc = Annotated[
    StrictInt | None,
    Field(
        ge=1,
        description="Chunk long documents into at most this many token windows, each scored with the "
        "query; a document scores its best window's score.",
    ),
]
ChunkOverlap = Annotated[
    StrictInt | None, Field(ge=0, description="Tokens shared by consecutive windows (default: the server's).")
]


class RerankRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE_REQUEST]})

    model: ModelName = None
    query: QueryText
    documents: list[StrictStr] = Field(
        min_length=1, description="Candidate texts to score against the query."
    )
    top_n: TopN = None
    return_documents: StrictBool = Field(False, description="Echo each document's text in its result.")
    raw_scores: RawScores = False
    long_documents: Literal["truncate", "chunk"] = Field(
        "truncate",
        description="Documents longer than the room the query leaves: `truncate` (the reference's "
        "longest-first cut) or `chunk` (score every window, keep the best).",
    )
    max_chunks_per_doc: MaxChunksPerDoc = None
    chunk_overlap: ChunkOverlap = None
    instruction: StrictStr | None = Field(
        None,
        description="An LLM reranker's task instruction (Qwen3-Reranker's `<Instruct>`, mxbai-rerank-v2's "
        "`instruction:`); unset, the model card's default. Other models take none.",
    )


class DocumentText(BaseModel):
    text: str


class ChunkInfo(BaseModel):
    """Which window of a chunked document won: its index among `count`, and the characters it covers."""

    index: int
    count: int
    start: int
    end: int

    @classmethod
    def of(cls, detail: DocumentScore) -> ChunkInfo:
        if detail.span is None:
            raise ValueError("the document was scored without chunk mode: no window span")
        start, end = detail.span
        return cls(index=detail.window, count=detail.windows, start=start, end=end)


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: DocumentText | None = None
    chunk: ChunkInfo | None = None


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, tokens: int) -> Usage:
        return cls(prompt_tokens=tokens, total_tokens=tokens)


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage
    query_truncated: bool | None = Field(
        None, description="Present (true) when the query lost tokens to fit the model's limit."
    )


class ModelInfo(BaseModel):
    name: str
    state: Literal["loading", "ready", "failed"]
    error: str | None = Field(None, description="why the model failed to load")
    backend: str | None = None
    family: str | None = Field(None, description="the network's architecture family, e.g. bert, xlm-roberta")
    device: str | None = None
    dtype: str | None = None
    max_length: int | None = None
    max_batch_tokens: int | None = None
    untrained: bool | None = Field(None, description="random weights: scores carry no meaning")
    load_seconds: float | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rerankd"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Readiness(BaseModel):
    """`/ready`'s answer. When the server has keys, a request without one gets `status` alone: model names and
    load errors (which may name server paths) are for key holders."""

    status: ServingStatus = Field(
        description="ready: every model serves; degraded: every model finished loading, some failed for "
        "good and the rest serve; loading; unhealthy: a loaded model's backend reports a problem; failed: no "
        "model serves"
    )
    ready: list[str] | None = Field(None, description="models that serve")
    pending: list[str] | None = Field(None, description="models still loading")
    failed: dict[str, str] | None = Field(
        None, description="models that failed to load, or whose backend is unhealthy, and why"
    )


class ServerInfo(BaseModel):
    version: str
    max_documents: int
    models: list[ModelInfo]
