"""The rerank engine of one model: tokenize off the event loop, queue pairs for batching, keep input order."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rerankd.backends.base import BackendInfo, RerankBackend
from rerankd.engine.scheduler import BatchObserver, BatchScheduler, RequestTiming
from rerankd.engine.tokenize import DEFAULT_PAIR_OPTIONS, EncodedDocument, PairOptions, PairTokenizer
from rerankd.settings import RuntimeSettings

logger = logging.getLogger(__name__)

WARMUP_QUERY = "rerankd warm-up"
WARMUP_DOCUMENTS = ["A short document to warm the model up.", ""]


def max_pair_length(settings: RuntimeSettings, info: BackendInfo) -> int:
    """Tokens a pair is truncated to: the settings' `max_length`, or the model's when shorter or unset. Unset,
    it is also capped at the batch token budget, so that a long-context model (ModernBERT's 8,192 positions)
    serves under the device's default budget; a `max_length` set past the budget is an error instead."""
    if settings.max_length is None:
        return min(info.max_length, settings.batch_tokens)
    return min(settings.max_length, info.max_length)


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
        self, query: str, documents: Sequence[str], options: PairOptions = DEFAULT_PAIR_OPTIONS
    ) -> ScoredDocuments:
        """Relevance of every document to the query, in input order. Raises `InputTooLongError` when
        `options` forbid truncation and a pair does not fit."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        encoded = await loop.run_in_executor(
            self._tokenize_pool, self.tokenizer.encode, query, documents, options
        )
        tokenized = time.perf_counter()
        pairs = encoded.pairs
        timing = RequestTiming()
        logits = await self.scheduler.submit(pairs, timing)
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

    def warm_up(self) -> None:
        """Score a small request once, on the forward thread (where every pass runs), before serving."""
        batch = self.tokenizer.encode_pairs(WARMUP_QUERY, WARMUP_DOCUMENTS)
        self._forward_thread.submit(self.backend.warm_up, batch).result()

    def health(self) -> str | None:
        """None while the model can serve; else the backend's reason."""
        return self.backend.health()

    def close(self) -> None:
        self.scheduler.stop()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._forward_thread.shutdown(wait=True, cancel_futures=True)
