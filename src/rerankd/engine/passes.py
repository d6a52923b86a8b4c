"""How a formed batch is cut into forward passes, where the backend has timed its passes (CUDA graphs).

A GPU's token budget fits a whole request of short and long pairs in one pass, all padded to the longest;
cut by length, the same pairs run as a few passes that together take less device time.
"""

from __future__ import annotations

from collections.abc import Sequence

from rerankd.backends.base import PassSeconds

# Pairs whose lengths round up to the same multiple of this are never split into different passes: a CUDA
# graph's bucket (cuda_graphs.LENGTH_STEP), and few enough cut points to weigh them all at every batch.
CUT_TOKENS = 16


def cheapest_first_pass(lengths: Sequence[int], pass_seconds: PassSeconds) -> int:
    """How many of a formed batch's pairs (`lengths`, in the order it took them) to run now, so that the batch
    runs as the sequence of passes that takes the least device time, by `pass_seconds(pairs, longest)`. Only
    the first pass is taken: the rest go back to the queue, to be weighed again with whatever arrives
    meanwhile. Cuts fall between runs of pairs of one length class (`CUT_TOKENS`); over the k runs this is the
    O(k²) dynamic program of the best split of a sequence."""
    runs: list[tuple[int, int]] = []  # (pairs, longest) of each run of equal length class
    for length in lengths:
        if runs and -(-length // CUT_TOKENS) == -(-runs[-1][1] // CUT_TOKENS):
            runs[-1] = (runs[-1][0] + 1, max(runs[-1][1], length))
        else:
            runs.append((1, length))
    # cheapest[i]: least time to run runs i.. ; first_cut[i]: where the first of those passes ends.
    cheapest = [0.0] * (len(runs) + 1)
    first_cut = [len(runs)] * (len(runs) + 1)
    for start in range(len(runs) - 1, -1, -1):
        pairs, longest, best = 0, 0, float("inf")
        for end in range(start + 1, len(runs) + 1):
            pairs += runs[end - 1][0]
            longest = max(longest, runs[end - 1][1])
            seconds = pass_seconds(pairs, longest) + cheapest[end]
            if seconds < best:
                best, first_cut[start] = seconds, end
        cheapest[start] = best
    return sum(pairs for pairs, _ in runs[: first_cut[0]])
