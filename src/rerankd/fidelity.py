"""Fidelity of a variant (another dtype, a quantized file) to its base model: cases and drift.

The model card of antflydb/mxbai-rerank-base-v1 judges a variant per validation case by whether the top-1
document and the full order are preserved and by the largest score difference. `rerankd validate` reports
that table; the `auto` precision policy applies the same test before it keeps a faster dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ValidationCase:
    name: str
    queries: list[tuple[str, list[str]]]  # (query, documents) groups scored together


@dataclass(frozen=True)
class Drift:
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


def ranking(scores: Sequence[float]) -> list[int]:
    """Indices from best to worst score; ties keep input order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def drift(base: Sequence[Sequence[float]], other: Sequence[Sequence[float]]) -> Drift:
    """How far `other`'s scores of the same (query, documents) groups stray from `base`'s."""
    pairs = list(zip(base, other, strict=True))
    return Drift(
        top1_preserved=all(ranking(a)[0] == ranking(b)[0] for a, b in pairs),
        order_preserved=all(ranking(a) == ranking(b) for a, b in pairs),
        max_abs_delta=max(abs(x - y) for a, b in pairs for x, y in zip(a, b, strict=True)),
    )
