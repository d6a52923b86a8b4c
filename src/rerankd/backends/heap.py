"""Give the memory freed between CPU batches back to the operating system.

Each batch allocates and frees activations of its own shape. glibc keeps the freed blocks in its heap, and the
long-lived kernels built for new shapes land between them, so the heap fragments and RSS keeps growing, even
with the kernel caches capped. `malloc_trim` returns the free pages. After every batch it costs speed (the
next batch faults its pages back in); after every 8th, an eighth of that, and RSS stays flat
(docs/decisions.md).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

BATCHES_PER_TRIM = 8


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # the loaded symbols: libc's among them
    except OSError:
        return None


class HeapTrimmer:
    """Counts batches and trims the heap after every `BATCHES_PER_TRIM`-th one."""

    def __init__(self) -> None:
        self._trim = _malloc_trim()
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
