"""Pack pairs into forward batches under a padded-token budget.

Pairs are sorted by length so each batch pads to a length close to all its members; a batch of n pairs whose
longest has L tokens costs n * L padded tokens, and that product stays within `max_batch_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_pairs: int) -> list[list[int]]:
    """Group indices of `lengths` into batches, shortest pairs first; a pair over the budget runs alone."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        longest = lengths[index]  # ascending order: the newest pair is the longest
        if current and ((len(current) + 1) * longest > max_batch_tokens or len(current) >= max_batch_pairs):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
