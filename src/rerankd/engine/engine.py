"""The rerank engine of one model: tokenize off the event loop, batch, run the backend, keep input order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rerankd.backends.base import BackendInfo, RerankBackend
from rerankd.engine.batching import plan_batches
from rerankd.engine.tokenize import PairTokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    max_length: int = 512  # tokens per (query, document) pair, after truncation
    max_batch_tokens: int = 16384  # padded tokens per forward pass (batch size x longest pair)
    max_batch_pairs: int = 64


@dataclass(frozen=True)
class ScoredPairs:
    logits: list[float]  # one per document, in input order
    token_count: int  # tokens fed to the model, special tokens included


class RerankEngine:
    """Owns one backend. Forward passes run one at a time in a dedicated thread (one in-flight batch per
    device); tokenization runs in its own small pool; the event loop only awaits."""

    def __init__(self, name: str, backend: RerankBackend, limits: EngineLimits) -> None:
        if limits.max_length > backend.info.max_length:
            raise ValueError(
                f"max length {limits.max_length} exceeds what the model accepts ({backend.info.max_length})"
            )
        if limits.max_batch_tokens < limits.max_length:
            raise ValueError(
                f"max batch tokens {limits.max_batch_tokens} must be at least the max length "
                f"{limits.max_length}"
            )
        self.name = name
        self.backend = backend
        self.limits = limits
        self.tokenizer = PairTokenizer(backend.tokenizer, limits.max_length)
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"tokenize-{name}")
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"forward-{name}")

    @property
    def info(self) -> BackendInfo:
        return self.backend.info

    async def score(self, query: str, documents: Sequence[str]) -> ScoredPairs:
        """Relevance logits of (query, document) for every document, in input order."""
        loop = asyncio.get_running_loop()
        token_ids = await loop.run_in_executor(
            self._tokenize_pool, self.tokenizer.encode_pairs, query, documents
        )
        lengths = [len(ids) for ids in token_ids]
        logits: list[float] = [0.0] * len(token_ids)
        for batch in plan_batches(lengths, self.limits.max_batch_tokens, self.limits.max_batch_pairs):
            batch_logits = await loop.run_in_executor(
                self._forward_thread, self.backend.relevance_logits, [token_ids[i] for i in batch]
            )
            for index, logit in zip(batch, batch_logits, strict=True):
                logits[index] = logit
        return ScoredPairs(logits=logits, token_count=sum(lengths))

    def close(self) -> None:
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._forward_thread.shutdown(wait=True, cancel_futures=True)
