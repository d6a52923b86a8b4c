"""The rerank engine of one model: tokenize off the event loop, queue pairs for batching, keep input order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from rerankd.backends.base import BackendInfo, RerankBackend
from rerankd.engine.scheduler import BatchLimits, BatchScheduler
from rerankd.engine.tokenize import PairTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    max_length: int = 512  # tokens per (query, document) pair, after truncation
    batching: BatchLimits = field(default_factory=BatchLimits)


@dataclass(frozen=True)
class ScoredPairs:
    logits: list[float]  # one per document, in input order
    token_count: int  # tokens fed to the model, special tokens included


class RerankEngine:
    """Owns one backend and its batch scheduler. Forward passes run one at a time in a dedicated thread (one
    in-flight batch per device); tokenization runs in its own small pool; the event loop only awaits."""

    def __init__(self, name: str, backend: RerankBackend, limits: EngineLimits) -> None:
        device_type = backend.info.device.split(":")[0]
        limits = replace(limits, batching=limits.batching.for_device(device_type))
        budget = limits.batching.max_batch_tokens or 0
        if limits.max_length > backend.info.max_length:
            raise ValueError(
                f"max length {limits.max_length} exceeds what the model accepts ({backend.info.max_length})"
            )
        if budget < limits.max_length:
            raise ValueError(f"max batch tokens {budget} must be at least the max length {limits.max_length}")
        self.name = name
        self.backend = backend
        self.limits = limits
        self.tokenizer = PairTokenizer(backend.tokenizer, limits.max_length)
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"tokenize-{name}")
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{name}")
        self.scheduler = BatchScheduler(backend.relevance_logits, self._forward_thread, limits.batching)

    @property
    def info(self) -> BackendInfo:
        return self.backend.info

    async def score(self, query: str, documents: Sequence[str]) -> ScoredPairs:
        """Relevance logits of (query, document) for every document, in input order."""
        loop = asyncio.get_running_loop()
        token_ids = await loop.run_in_executor(
            self._tokenize_pool, self.tokenizer.encode_pairs, query, documents
        )
        logits = await self.scheduler.submit(token_ids)
        return ScoredPairs(logits=logits, token_count=sum(len(ids) for ids in token_ids))

    def close(self) -> None:
        self.scheduler.stop()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._forward_thread.shutdown(wait=True, cancel_futures=True)
