"""Turn relevance logits into the ranked list a client sees."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def sigmoid(logit: float) -> float:
    """Numerically safe logistic function (no overflow for large |logit|)."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    exp = math.exp(logit)
    return exp / (1.0 + exp)


@dataclass(frozen=True)
class RankedDocument:
    index: int
    score: float


def rank(logits: Sequence[float], raw_scores: bool = False, top_n: int | None = None) -> list[RankedDocument]:
    """Scores (sigmoid unless `raw_scores`) sorted descending, ties by input order, then cut to `top_n`."""
    scores = [logit if raw_scores else sigmoid(logit) for logit in logits]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if top_n is not None:
        order = order[:top_n]
    return [RankedDocument(index=i, score=scores[i]) for i in order]
