"""`rerankd eval`: how much does reranking BM25's top k improve retrieval on judged queries, and how far do
the scores and rankings of model variants (other dtypes, quantized files, other servers) drift from the first?

Every reranker scores the same candidates (BM25's top k of each query), so the quality numbers compare
rerankers on equal footing and the drift numbers compare scores of identical (query, document) pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from rerankd.quality.beir import JudgedBeir
from rerankd.quality.bm25 import BM25Index
from rerankd.quality.metrics import kendall_tau_b, ndcg, ranking, recall, reciprocal_rank
from rerankd.quality.scorers import Scorer

Run = dict[str, dict[str, float]]  # query id -> {document id: score}
Metric = Callable[[Mapping[str, int], Mapping[str, float]], float]

MEASURES: dict[str, Metric] = {
    "nDCG@10": lambda judgments, run: ndcg(judgments, run, 10),
    "MRR@10": lambda judgments, run: reciprocal_rank(judgments, run, 10),
    "Recall@10": lambda judgments, run: recall(judgments, run, 10),
    "Recall@100": lambda judgments, run: recall(judgments, run, 100),
}
DTYPES = ("float32", "bfloat16", "float16", "auto")


@dataclass(frozen=True)
class SystemResult:
    """One ranking system (the first stage, or a reranker of its candidates) on every evaluated query."""

    label: str
    run: Run
    per_query: dict[str, dict[str, float]]  # query id -> {measure: value}

    def mean(self, measure: str) -> float:
        return sum(values[measure] for values in self.per_query.values()) / len(self.per_query)


@dataclass(frozen=True)
class Drift:
    """How a variant's scores of the same candidates stray from the base reranker's."""

    variant: str
    mean_abs_delta: float
    max_abs_delta: float
    kendall_tau: float  # mean over queries of tau-b between the two scorings (NaN: undefined everywhere)
    top1_agreement: int  # queries whose best candidate is the same
    ndcg_changed: int  # queries whose nDCG@10 differs
    queries: int


@dataclass(frozen=True)
class EvalReport:
    dataset: str
    split: str
    k: int
    queries: list[str]  # the evaluated query ids
    notes: list[str]  # what the data left out
    systems: list[SystemResult]  # the first stage, then each reranker
    drift: list[Drift]  # each reranker after the first, against the first


def split_model_spec(spec: str) -> tuple[str, str | None]:
    """`MODEL@DTYPE` -> (MODEL, DTYPE); a spec without a known dtype after its last `@` is all model."""
    model, separator, dtype = spec.rpartition("@")
    return (model, dtype) if separator and model and dtype in DTYPES else (spec, None)


def evaluate(
    data: JudgedBeir,
    rerankers: Sequence[Callable[[], Scorer]],
    k: int,
    max_queries: int | None = None,
    progress: bool = False,
) -> EvalReport:
    """BM25's top k for each evaluated query, reranked by each scorer (loaded one at a time), measured;
    `progress` shows bars for the indexing and the scoring (for a terminal)."""
    dataset = data.dataset
    query_ids = data.query_ids[:max_queries]
    index = BM25Index(dataset.passages, progress=progress)
    first_stage = {qid: index.top_k(dataset.queries[qid], k) for qid in query_ids}
    systems = [measure("BM25", first_stage, dataset.judgments)]
    for make_scorer in rerankers:
        scorer = make_scorer()
        try:
            run = rerank(scorer, first_stage, dataset.queries, dataset.passages, progress)
        finally:
            scorer.close()
        systems.append(measure(scorer.label, run, dataset.judgments))
    drift = [measure_drift(systems[1], variant) for variant in systems[2:]]
    return EvalReport(dataset.name, data.qrels.stem, k, query_ids, data.warnings(), systems, drift)


def rerank(
    scorer: Scorer,
    candidates: Run,
    queries: Mapping[str, str],
    passages: Mapping[str, str],
    progress: bool = False,
) -> Run:
    """The scorer's score of every candidate of every query (one request per query)."""
    run: Run = {}
    for query_id, docs in tqdm(candidates.items(), desc=scorer.label, unit="query", disable=not progress):
        scores = scorer.scores(queries[query_id], [passages[doc] for doc in docs])
        run[query_id] = dict(zip(docs, scores, strict=True))
    return run


def measure(label: str, run: Run, judgments: Mapping[str, Mapping[str, int]]) -> SystemResult:
    per_query = {
        qid: {name: metric(judgments[qid], docs) for name, metric in MEASURES.items()}
        for qid, docs in run.items()
    }
    return SystemResult(label, run, per_query)


def paired_scores(base: SystemResult, variant: SystemResult) -> tuple[list[float], list[float]]:
    """The two systems' scores of the same (query, document) pairs, in the same order."""
    pairs = [(docs[doc], variant.run[qid][doc]) for qid, docs in base.run.items() for doc in docs]
    return [a for a, _ in pairs], [b for _, b in pairs]


def measure_drift(base: SystemResult, variant: SystemResult) -> Drift:
    first, second = paired_scores(base, variant)
    deltas = [abs(a - b) for a, b in zip(first, second, strict=True)]
    taus = []
    for qid, docs in base.run.items():
        taus.append(kendall_tau_b(list(docs.values()), [variant.run[qid][doc] for doc in docs]))
    defined = [tau for tau in taus if not math.isnan(tau)]
    return Drift(
        variant=variant.label,
        mean_abs_delta=sum(deltas) / len(deltas),
        max_abs_delta=max(deltas),
        kendall_tau=sum(defined) / len(defined) if defined else math.nan,
        top1_agreement=sum(ranking(base.run[q])[0] == ranking(variant.run[q])[0] for q in base.run),
        ndcg_changed=sum(
            base.per_query[q]["nDCG@10"] != variant.per_query[q]["nDCG@10"] for q in base.per_query
        ),
        queries=len(base.run),
    )
