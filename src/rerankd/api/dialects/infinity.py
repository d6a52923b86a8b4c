"""Infinity's `/rerank` answer, for `infinity_client`: it always sends Infinity's placeholder model name and
reads each result's `document` as a plain string."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel

from rerankd.api.schemas import Usage
from rerankd.api.service import RerankOutcome

# `infinity_client.models.RerankInput.model`'s default: the server's default model.
INFINITY_DEFAULT_MODEL = "default/not-specified"


class InfinityRerankResult(BaseModel):
    relevance_score: float
    index: int
    document: str | None = None


class InfinityRerankResponse(BaseModel):
    object: Literal["rerank"] = "rerank"
    id: str
    created: int
    model: str
    results: list[InfinityRerankResult]
    usage: Usage


def infinity_response(
    outcome: RerankOutcome, texts: Sequence[str], return_documents: bool
) -> InfinityRerankResponse:
    return InfinityRerankResponse(
        id=outcome.id,
        created=int(time.time()),
        model=outcome.model,
        results=[
            InfinityRerankResult(
                relevance_score=item.score,
                index=item.index,
                document=texts[item.index] if return_documents else None,
            )
            for item in outcome.results
        ],
        usage=Usage.of(outcome.token_count),
    )
