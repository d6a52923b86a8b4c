"""Retrieval metrics as trec_eval computes them, and Kendall's tau-b for the agreement of two scorings.

Our own few lines rather than a dependency on trec_eval's C code, checked equal to `ir_measures` with its
`pytrec_eval` backend in the tests. Conventions, all trec_eval's:

- A run is {document id: score}. It is ranked by score, descending; equal scores are ordered by document id,
  descending (trec_eval sorts ties by `strcmp` of the docno, reversed). So a run gives the same numbers here
  and in trec_eval whatever order its documents were listed in, and ties never depend on who scored first.
- Judgments are {document id: graded label}. nDCG's gain is the label itself (linear, trec_eval's default;
  labels <= 0 gain nothing), discounted by log2(rank + 1), over the ideal ordering of every judged document.
- Reciprocal rank and recall count a document as relevant when its label is >= 1; recall's denominator is
  every relevant judged document, retrieved or not (0.0 when there is none).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

RELEVANT = 1  # the lowest label that counts as relevant for reciprocal rank and recall


def ranking(run: Mapping[str, float]) -> list[str]:
    """Document ids best first, ties by document id descending (trec_eval's order)."""
    return [doc for doc, _ in sorted(run.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def ndcg(judgments: Mapping[str, int], run: Mapping[str, float], depth: int) -> float:
    """nDCG@depth with graded (linear) gains."""
    gains = [max(judgments.get(doc, 0), 0) for doc in ranking(run)[:depth]]
    ideal = sorted((max(label, 0) for label in judgments.values()), reverse=True)[:depth]
    best = _dcg(ideal)
    return _dcg(gains) / best if best > 0 else 0.0


def reciprocal_rank(judgments: Mapping[str, int], run: Mapping[str, float], depth: int) -> float:
    """1 / rank of the first relevant document in the top `depth`, else 0 (MRR@depth once averaged)."""
    for position, doc in enumerate(ranking(run)[:depth], start=1):
        if judgments.get(doc, 0) >= RELEVANT:
            return 1.0 / position
    return 0.0


def recall(judgments: Mapping[str, int], run: Mapping[str, float], depth: int) -> float:
    """Share of the relevant judged documents found in the top `depth`."""
    relevant = {doc for doc, label in judgments.items() if label >= RELEVANT}
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking(run)[:depth])) / len(relevant)


def _dcg(gains: Sequence[int]) -> float:
    return sum(gain / math.log2(position + 1) for position, gain in enumerate(gains, start=1))


def kendall_tau_b(first: Sequence[float], second: Sequence[float]) -> float:
    """Kendall's tau-b of two scorings of the same documents (as scipy.stats.kendalltau): 1 when they order
    every pair alike, ties in either counted as neither agreement nor disagreement. NaN when either scores
    all documents alike (or there are fewer than two), where the statistic is undefined."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    upper = np.triu_indices(len(a), k=1)
    sign_a = np.sign(a[:, None] - a[None, :])[upper]
    sign_b = np.sign(b[:, None] - b[None, :])[upper]
    untied_a, untied_b = np.count_nonzero(sign_a), np.count_nonzero(sign_b)
    if untied_a == 0 or untied_b == 0:
        return math.nan
    return float(np.sum(sign_a * sign_b) / math.sqrt(untied_a * untied_b))
