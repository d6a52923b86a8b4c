"""`rerankd validate`: does a variant (a quantized GGUF, another dtype, another server) rank like its base?

The model card of antflydb/mxbai-rerank-base-v1 reports, per validation case, whether the top-1 document and
the full order are preserved and the largest score difference against the base. This reproduces that table
for any set of variants, plus a run over real retrieval passages when a BEIR folder is given.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rerankd.fidelity import ValidationCase, drift
from rerankd.quality.beir import load_beir, query_with_passages
from rerankd.quality.scorers import Scorer


@dataclass(frozen=True)
class CaseResult:
    variant: str
    case: str
    top1_preserved: bool
    order_preserved: bool
    max_abs_delta: float


def beir_case(folder: Path, max_queries: int = 10, documents_per_query: int = 20) -> ValidationCase:
    """Judged queries of a BEIR folder, each with its judged passages padded by others from the corpus."""
    dataset = load_beir(folder)
    groups = []
    for offset, query_id in enumerate(dataset.judged_query_ids()[:max_queries]):
        chosen = query_with_passages(dataset, query_id, documents_per_query, offset * documents_per_query)
        groups.append((dataset.queries[query_id], [dataset.passages[pid] for pid in chosen]))
    return ValidationCase(f"{folder.name} passages ({len(groups)} queries)", groups)


def compare(
    variant: str, case: ValidationCase, base: list[list[float]], other: list[list[float]]
) -> CaseResult:
    measured = drift(base, other)
    return CaseResult(
        variant, case.name, measured.top1_preserved, measured.order_preserved, measured.max_abs_delta
    )


def case_scores(scorer: Scorer, cases: Sequence[ValidationCase]) -> list[list[list[float]]]:
    return [[scorer.scores(query, documents) for query, documents in case.queries] for case in cases]


def validate(
    base: Callable[[], Scorer], variants: Sequence[Callable[[], Scorer]], cases: Sequence[ValidationCase]
) -> list[CaseResult]:
    """Score every case with the base, then with each variant (one model loaded at a time), and compare."""
    scorer = base()
    try:
        reference = case_scores(scorer, cases)
    finally:
        scorer.close()
    results = []
    for make_variant in variants:
        scorer = make_variant()
        try:
            scores = case_scores(scorer, cases)
        finally:
            scorer.close()
        results += [
            compare(scorer.label, case, expected, actual)
            for case, expected, actual in zip(cases, reference, scores, strict=True)
        ]
    return results


def render_table(base_label: str, results: Sequence[CaseResult]) -> str:
    """The model card's table: one row per (variant, case)."""
    lines = [
        f"base: {base_label}",
        "",
        "| variant | case | top-1 preserved | order preserved | max abs Δscore |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        lines.append(
            f"| {result.variant} | {result.case} | {'yes' if result.top1_preserved else 'NO'} | "
            f"{'yes' if result.order_preserved else 'no'} | {result.max_abs_delta:.4f} |"
        )
    for variant, rows in itertools.groupby(results, key=lambda result: result.variant):
        worst = max(row.max_abs_delta for row in rows)
        lines.append(f"\n{variant}: max abs Δscore over all cases {worst:.4f}")
    return "\n".join(lines)


def results_json(base_label: str, results: Sequence[CaseResult]) -> str:
    return json.dumps({"base": base_label, "results": [asdict(result) for result in results]}, indent=2)
