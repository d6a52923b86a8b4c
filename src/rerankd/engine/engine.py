"""The rerank engine of one model: tokenize off the event loop, queue pairs for batching, keep input order."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from rerankd.backends.base import BackendInfo, RerankBackend
from rerankd.engine.scheduler import BatchLimits, BatchObserver, BatchScheduler, RequestTiming
from rerankd.engine.tokenize import DEFAULT_PAIR_OPTIONS, EncodedDocument, PairOptions, PairTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    max_length: int = 512  # tokens per (query, document) pair, after truncation
    batching: BatchLimits = field(default_factory=BatchLimits)


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
    pool; the event loop only awaits."""

    def __init__(
        self, name: str, backend: RerankBackend, limits: EngineLimits, on_batch: BatchObserver | None = None
    ) -> None:
        device_type = backend.info.device.split(":")[0]
        limits = replace(limits, batching=limits.batching.for_device(device_type))
        budget = limits.batching.max_batch_tokens or 0
        if limits.max_length > backend.info.max_length:
            raise ValueError(
                f"max length {limits.max_length} exceeds what the model accepts ({backend.info.max_length})"
            )
        if budget < limits.max_length:
            raise ValueError(f"max batch tokens {budget} must be at least the max length {limits.max_length}")
        backend.prepare_for_serving(budget, limits.batching.max_batch_pairs)
        self.name = name
        self.backend = backend
        self.limits = limits
        self.tokenizer = PairTokenizer(backend.tokenizer, limits.max_length)
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"tokenize-{name}")
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{name}")
        self.scheduler = BatchScheduler(
            backend.launch,
            self._forward_thread,
            limits.batching,
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
        token_ids = encoded.token_ids
        timing = RequestTiming()
        logits = await self.scheduler.submit(token_ids, timing)
        scores = []
        position = 0
        for document in encoded.documents:
            count = len(document.windows)
            scores.append(DocumentScore.best_of(document, logits[position : position + count]))
            position += count
        return ScoredDocuments(
            documents=scores,
            token_count=sum(len(ids) for ids in token_ids),
            pair_count=len(token_ids),
            query_truncated=encoded.query_truncated,
            tokenization_seconds=tokenized - started,
            queue_seconds=timing.queue_seconds,
            inference_seconds=timing.inference_seconds,
        )

    def close(self) -> None:
        self.scheduler.stop()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._forward_thread.shutdown(wait=True, cancel_futures=True)
