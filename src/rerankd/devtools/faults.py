"""Test-only fault injection: a backend whose forward pass fails for batches holding a marked pair.

Set `RERANKD_TEST_FAULT_MARKER` to a word; every forward pass that holds a pair containing it raises. Tests
use it to show that a failing batch fails only its own requests, through a real server.
"""

from __future__ import annotations

from collections.abc import Sequence

from rerankd.backends.base import PassSeconds, RerankBackend

FAULT_MARKER_ENV = "RERANKD_TEST_FAULT_MARKER"


class InjectedFault(RuntimeError):
    pass


def _contains(haystack: Sequence[int], needle: Sequence[int]) -> bool:
    size = len(needle)
    return any(
        list(haystack[start : start + size]) == list(needle) for start in range(len(haystack) - size + 1)
    )


class FaultInjectingBackend(RerankBackend):
    """Delegates to `inner`, except that a batch with a pair containing `marker`'s tokens raises."""

    def __init__(self, inner: RerankBackend, marker: str) -> None:
        self._inner = inner
        self.info = inner.info
        self.tokenizer = inner.tokenizer
        self._marker_ids = inner.tokenizer.encode(marker, add_special_tokens=False).ids

    def relevance_logits(self, input_ids: Sequence[Sequence[int]]) -> list[float]:
        if any(_contains(ids, self._marker_ids) for ids in input_ids):
            raise InjectedFault("injected forward failure")
        return self._inner.relevance_logits(input_ids)

    def faster_dtype(self) -> str | None:
        return self._inner.faster_dtype()

    def cast(self, dtype: str) -> None:
        self._inner.cast(dtype)
        self.info = self._inner.info

    def prepare_for_serving(self, batch_tokens: int, batch_pairs: int) -> None:
        self._inner.prepare_for_serving(batch_tokens, batch_pairs)

    def pass_seconds(self) -> PassSeconds | None:
        return self._inner.pass_seconds()
