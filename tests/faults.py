"""Fault injection for tests: `rerankd serve` whose backends fail every forward pass holding a marked word.

`python tests/faults.py MARKER serve ...` runs the real server (rerankd's own command line) with each loaded
backend wrapped so that a batch with a pair containing MARKER raises; tests use it to show that a failing
batch fails only its own requests, through a real server. Production code knows nothing of it: the wrapper
reaches the loader through `rerankd.cli.serve.run`'s `wrap_backend`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rerankd.backends.base import Batch, PassSeconds, RerankBackend
from rerankd.cli import build_parser, serve


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

    def relevance_logits(self, batch: Batch) -> list[float]:
        if any(_contains(ids, self._marker_ids) for ids in batch.input_ids):
            raise InjectedFault("injected forward failure")
        return self._inner.relevance_logits(batch)

    def faster_dtypes(self) -> tuple[tuple[str, ...], ...]:
        return self._inner.faster_dtypes()

    def cast(self, dtype: str) -> None:
        self._inner.cast(dtype)
        self.info = self._inner.info

    def prepare_for_serving(self) -> None:
        self._inner.prepare_for_serving()

    def pass_seconds(self) -> PassSeconds | None:
        return self._inner.pass_seconds()


def main(argv: Sequence[str]) -> int:
    marker, *serve_args = argv
    args = build_parser().parse_args(serve_args)
    return serve.run(args, wrap_backend=lambda backend: FaultInjectingBackend(backend, marker))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
