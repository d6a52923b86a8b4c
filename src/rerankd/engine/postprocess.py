"""Turn scored documents into the ranked list a client sees."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rerankd.engine.engine import DocumentScore


def sigmoid(logit: float) -> float:
    """Numerically safe logistic function (no overflow for large |logit|)."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    exp = math.exp(logit)
    return exp / (1.0 + exp)


@dataclass(frozen=True)
class RankedDocument:
    index: int  # in the request's documents
    score: float  # what the client sees: the sigmoid of the logit, or the logit itself (raw scores)
    detail: DocumentScore  # which window won, for chunk mode's answer


def rank(
    documents: Sequence[DocumentScore], raw_scores: bool = False, top_n: int | None = None
) -> list[RankedDocument]:
    """Scores (sigmoid unless `raw_scores`) sorted descending, ties by input order, then cut to `top_n`."""
    scores = [document.logit if raw_scores else sigmoid(document.logit) for document in documents]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if top_n is not None:
        order = order[:top_n]
    return [RankedDocument(index=i, score=scores[i], detail=documents[i]) for i in order]
