"""The rerank engine of one model: tokenize off the event loop, queue pairs for batching, keep input order."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from rerankd.backends.base import BackendInfo, RerankBackend
from rerankd.engine.scheduler import BatchObserver, BatchScheduler, RequestTiming
from rerankd.engine.tokenize import (
    DEFAULT_PAIR_OPTIONS,
    EncodedDocument,
    EncodedRequest,
    PairOptions,
    PairTokenizer,
)
from rerankd.settings import RuntimeSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Documents tokenized per turn of the tokenizer pool: small enough that cancelling a request, or a small
# request arriving behind a large one, waits for little; large enough that the turns cost little (~50 us).
TOKENIZE_SLICE = 64
# A request of at most this many characters is tokenized on the event loop (at most ~2 ms of it).
INLINE_TOKENIZE_CHARS = 8192
WARMUP_QUERY = "rerankd warm-up"
WARMUP_DOCUMENTS = ["A short document to warm the model up.", ""]


def max_pair_length(settings: RuntimeSettings, info: BackendInfo) -> int:
    """Tokens a pair is truncated to: the settings' `max_length`, or the model's when shorter or unset. Unset,
    it is also capped at the batch token budget, so that a long-context model (ModernBERT's 8,192 positions)
    serves under the device's default budget; a `max_length` set past the budget is an error instead."""
    if settings.max_length is None:
        return min(info.max_length, settings.batch_tokens)
    return min(settings.max_length, info.max_length)


class TooManyPairsError(ValueError):
    """A request makes more (query, window) pairs than one request may."""

    def __init__(self, pairs: int, limit: int, documents: int) -> None:
        super().__init__(
            f"the request makes more than {limit} (query, window) pairs ({pairs} from its first {documents} "
            "documents; --max-request-pairs): send fewer documents, or fewer windows per document"
        )


class NonFiniteScoresError(RuntimeError):
    """The model's logits are NaN or infinite: its weights are broken, and none of its scores means much."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"model {model!r} produced non-finite scores (NaN or infinity): its weights are broken"
        )


@dataclass(frozen=True)
class DocumentScore:
    """A document's score: its best window's logit, and which window that was."""

    logit: float
    window: int  # index of the winning window; 0 unless the document was chunked
    windows: int  # how many windows were scored
    span: tuple[int, int] | None  # characters of the document the winning window covers (chunk mode)
    truncated: bool  # part of the document was in no window

    @classmethod
    def best_of(cls, document: EncodedDocument, logits: Sequence[float]) -> DocumentScore:
        best = max(range(len(logits)), key=lambda index: logits[index])
        window = document.windows[best]
        return cls(logits[best], best, len(logits), window.span, document.truncated)


@dataclass(frozen=True)
class ScoredDocuments:
    documents: list[DocumentScore]  # in input order
    token_count: int  # tokens fed to the model, special tokens included
    pair_count: int  # (query, window) pairs scored
    query_truncated: bool
    tokenization_seconds: float
    queue_seconds: float  # from joining the queue until the first batch with its pairs started
    inference_seconds: float  # from then until its last pair was scored

    @property
    def logits(self) -> list[float]:
        return [document.logit for document in self.documents]


class RerankEngine:
    """Owns one backend and its batch scheduler. Forward passes run one at a time in a dedicated thread (one
    batch running per device; a GPU gets the next one queued behind it); tokenization runs in its own small
    pool; the event loop only awaits. `settings` are the ones the backend was loaded with (resolved for its
    device); pairs are truncated to their `max_length`, or the model's when that is shorter or unset."""

    def __init__(
        self,
        name: str,
        backend: RerankBackend,
        settings: RuntimeSettings,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.max_length = max_pair_length(settings, backend.info)
        budget = settings.batch_tokens
        if budget < self.max_length:
            raise ValueError(f"max batch tokens {budget} must be at least the max length {self.max_length}")
        if self.max_length < backend.info.max_length and settings.max_length is None:
            logger.info(
                "%s: pairs are truncated to %d tokens, the batch token budget (the model takes %d: raise "
                "--max-batch-tokens to serve longer pairs)",
                name,
                self.max_length,
                backend.info.max_length,
            )
        backend.prepare_for_serving()
        self.name = name
        self.backend = backend
        self.settings = settings
        self.tokenizer = PairTokenizer(backend.tokenizer, self.max_length, backend.prompt)
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"tokenize-{name}")
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{name}")
        self.scheduler = BatchScheduler(
            backend.launch,
            self._forward_thread,
            settings,
            on_batch=on_batch,
            pass_seconds=backend.pass_seconds(),
        )

    @property
    def info(self) -> BackendInfo:
        return self.backend.info

    async def score(
        self,
        query: str,
        documents: Sequence[str],
        options: PairOptions = DEFAULT_PAIR_OPTIONS,
        max_pairs: int | None = None,
    ) -> ScoredDocuments:
        """Relevance of every document to the query, in input order. The request is admitted to the queue
        before any work is spent on it (`QueueFullError` if not), then tokenized a slice at a time, so that
        cancelling it stops its tokenization too. Raises `TooManyPairsError` past `max_pairs` (query, window)
        pairs, `InputTooLongError` when `options` forbid truncation and a pair does not fit, and
        `NonFiniteScoresError` when the model's logits are not numbers."""
        admission = self.scheduler.admit(len(documents))
        try:
            started = time.perf_counter()
            encoded = await self._encode(query, documents, options, max_pairs)
            tokenized = time.perf_counter()
            pairs = encoded.pairs
            timing = RequestTiming()
            logits = await self.scheduler.submit(pairs, timing, admission)
        finally:
            self.scheduler.release(admission)
        self._check_finite(logits)
        scores = []
        position = 0
        for document in encoded.documents:
            count = len(document.windows)
            scores.append(DocumentScore.best_of(document, logits[position : position + count]))
            position += count
        return ScoredDocuments(
            documents=scores,
            token_count=sum(len(pair) for pair in pairs),
            pair_count=len(pairs),
            query_truncated=encoded.query_truncated,
            tokenization_seconds=tokenized - started,
            queue_seconds=timing.queue_seconds,
            inference_seconds=timing.inference_seconds,
        )

    async def _encode(
        self, query: str, documents: Sequence[str], options: PairOptions, max_pairs: int | None
    ) -> EncodedRequest:
        """The request's pairs, encoded in the tokenizer pool a slice of documents at a time: the event loop
        stops handing out slices once the request is cancelled (a client gone, a timeout) or has passed
        `max_pairs`, and other requests' slices take turns with its own. A request of a few KB is encoded
        on the event loop instead: in less time than a hop to the pool, and never queued behind a large
        request's slices."""
        loop = asyncio.get_running_loop()
        inline = len(query) + sum(len(document) for document in documents) <= INLINE_TOKENIZE_CHARS

        async def encoded(function: Callable[..., T], *args: Any) -> T:
            if inline:
                return function(*args)
            return await loop.run_in_executor(self._tokenize_pool, function, *args)

        query_ids = await encoded(self.tokenizer.encode_query, query, options.instruction)
        parts: list[EncodedRequest] = []
        pairs = 0
        for first in range(0, len(documents), TOKENIZE_SLICE):
            slice_ = documents[first : first + TOKENIZE_SLICE]
            part = await encoded(self.tokenizer.encode_documents, query_ids, slice_, options, first)
            pairs += len(part.pairs)
            if max_pairs is not None and pairs > max_pairs:
                raise TooManyPairsError(pairs, max_pairs, first + len(part.documents))
            parts.append(part)
        return EncodedRequest.joined(parts)

    def warm_up(self) -> None:
        """Run the backend's warm-up pass, then score the warm-up pairs as requests are scored (`launch`), on
        the forward thread where every pass runs. Logits that are not numbers raise `NonFiniteScoresError`:
        a model with broken (NaN) weights then fails its load, instead of serving null scores."""
        batch = self.tokenizer.encode_pairs(WARMUP_QUERY, WARMUP_DOCUMENTS)
        self._forward_thread.submit(self.backend.warm_up, batch).result()
        logits = self._forward_thread.submit(lambda: self.backend.launch(batch).result()).result()
        self._check_finite(logits)

    def _check_finite(self, logits: Sequence[float]) -> None:
        if not all(math.isfinite(logit) for logit in logits):
            raise NonFiniteScoresError(self.name)

    def health(self) -> str | None:
        """None while the model can serve; else the backend's reason."""
        return self.backend.health()

    def close(self) -> None:
        self.scheduler.stop()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._forward_thread.shutdown(wait=True, cancel_futures=True)
