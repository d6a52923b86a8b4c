"""glibc's heap between CPU batches: freed activations reused by the next batch, free pages given back.

Each batch allocates and frees activations of its own shape. glibc keeps the freed blocks in its heap, and the
long-lived kernels built for new shapes land between them, so the heap fragments and RSS keeps growing, even
with the kernel caches capped. `malloc_trim` returns the free pages. After every batch it costs speed (the
next batch faults its pages back in); after every 8th, an eighth of that, and RSS stays flat
(docs/decisions.md).

glibc's defaults give a block of a few megabytes or more its own mapping, returned to the OS when freed, and
give the top of the heap back once over 128 KB: then a batch can fault its activations' pages in anew (on
base, 2 x 512 tokens in process, about 125,000 faults, a third of the pass; in a server how many depends on
what the process freed before, since glibc's thresholds follow it). `keep_activations_in_heap` raises both
limits, so a batch reuses the blocks the one before it freed; the trims above still bound RSS.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

BATCHES_PER_TRIM = 8
# Blocks up to this size come from the heap; the heap's free top goes back to the OS past twice that (glibc's
# own ratio). 64 MB: above a batch's largest activation at the CPU's default token budget (base, float32,
# 1,024 tokens: 25 MB of attention scores) (docs/decisions.md).
HEAP_BLOCK_LIMIT = 64 * 2**20
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's malloc.h
# Where a user tunes glibc's allocator, their settings stand.
ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def _glibc_function(name: str) -> Callable[..., int] | None:
    """glibc's `name` (`malloc_trim`, `mallopt`), or None where the C library has none (musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(None), name, None)  # the loaded symbols: libc's among them
    except OSError:
        return None


def keep_activations_in_heap() -> bool:
    """Let freed activations' blocks serve the next batch instead of going back to the OS (glibc's `mallopt`).
    False where the C library has no `mallopt` or the user tunes the allocator in the environment."""
    mallopt = _glibc_function("mallopt")
    if mallopt is None or any(variable in os.environ for variable in ALLOCATOR_VARIABLES):
        return False
    mapped_alone = mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)
    return bool(mapped_alone and mallopt(M_TRIM_THRESHOLD, 2 * HEAP_BLOCK_LIMIT))


class HeapTrimmer:
    """Counts batches and trims the heap after every `BATCHES_PER_TRIM`-th one."""

    def __init__(self) -> None:
        self._trim = _glibc_function("malloc_trim")
        self._batches = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def batch_done(self) -> None:
        self._batches += 1
        if self._batches % BATCHES_PER_TRIM == 0:
            self.trim()

    def trim(self) -> None:
        if self._trim is not None:
            self._trim(0)
