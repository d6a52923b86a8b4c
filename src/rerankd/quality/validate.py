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

from rerankd.quality.beir import load_beir, query_with_passages
from rerankd.quality.scorers import Scorer


@dataclass(frozen=True)
class ValidationCase:
    name: str
    queries: list[tuple[str, list[str]]]  # (query, documents) groups scored together


@dataclass(frozen=True)
class CaseResult:
    variant: str
    case: str
    top1_preserved: bool
    order_preserved: bool
    max_abs_delta: float


MOCKINGBIRD = "Who wrote To Kill a Mockingbird?"


def builtin_cases() -> list[ValidationCase]:
    """The model card's four cases."""
    basic = [
        "To Kill a Mockingbird is a novel by Harper Lee.",
        "Moby-Dick was written by Herman Melville.",
        "Jane Austen wrote Pride and Prejudice.",
    ]
    long_document = " ".join(["Harper Lee grew up in Monroeville, Alabama, the setting of her novel."] * 120)
    ordering = [
        "The Great Gatsby is a 1925 novel by F. Scott Fitzgerald.",
        "Harper Lee published To Kill a Mockingbird in 1960 and won the Pulitzer Prize.",
        "Mockingbirds are songbirds known for mimicking the calls of other birds.",
        "Go Set a Watchman, written by Harper Lee, was published in 2015.",
        "The novel To Kill a Mockingbird is narrated by Scout Finch.",
        "George Orwell wrote Nineteen Eighty-Four.",
        "Truman Capote was a childhood friend of Harper Lee.",
        "The film adaptation of To Kill a Mockingbird starred Gregory Peck.",
    ]
    return [
        ValidationCase("basic relevance ranking", [(MOCKINGBIRD, basic)]),
        ValidationCase("empty document", [(MOCKINGBIRD, ["", basic[0], basic[1]])]),
        ValidationCase("long-input truncation", [(MOCKINGBIRD, [long_document, basic[0], "word " * 3000])]),
        ValidationCase("multi-document ordering", [(MOCKINGBIRD, ordering)]),
    ]


def beir_case(folder: Path, max_queries: int = 10, documents_per_query: int = 20) -> ValidationCase:
    """Judged queries of a BEIR folder, each with its judged passages padded by others from the corpus."""
    dataset = load_beir(folder)
    groups = []
    for offset, query_id in enumerate(dataset.judged_query_ids()[:max_queries]):
        chosen = query_with_passages(dataset, query_id, documents_per_query, offset * documents_per_query)
        groups.append((dataset.queries[query_id], [dataset.passages[pid] for pid in chosen]))
    return ValidationCase(f"{folder.name} passages ({len(groups)} queries)", groups)


def _order(scores: Sequence[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def compare(
    variant: str, case: ValidationCase, base: list[list[float]], other: list[list[float]]
) -> CaseResult:
    top1 = all(_order(a)[0] == _order(b)[0] for a, b in zip(base, other, strict=True))
    order = all(_order(a) == _order(b) for a, b in zip(base, other, strict=True))
    delta = max(abs(x - y) for a, b in zip(base, other, strict=True) for x, y in zip(a, b, strict=True))
    return CaseResult(variant, case.name, top1, order, delta)


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
