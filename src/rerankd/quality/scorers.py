"""Score (query, documents) with a model in this process or through a running rerankd, for quality tools."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import httpx

from rerankd.engine.engine import RerankEngine
from rerankd.engine.postprocess import sigmoid


class Scorer(Protocol):
    label: str

    def scores(self, query: str, documents: Sequence[str]) -> list[float]:
        """Relevance (sigmoid of the logit) of each document, in input order."""
        ...

    def close(self) -> None: ...


class EngineScorer:
    """A model loaded in this process."""

    def __init__(self, label: str, engine: RerankEngine) -> None:
        self.label = label
        self._engine = engine
        # One event loop for the scorer's life: the engine's batch scheduler lives on it.
        self._runner = asyncio.Runner()

    def scores(self, query: str, documents: Sequence[str]) -> list[float]:
        scored = self._runner.run(self._engine.score(query, documents))
        return [sigmoid(logit) for logit in scored.logits]

    def close(self) -> None:
        self._runner.close()  # cancels the scheduler's task on its own loop
        self._engine.close()


class HTTPScorer:
    """A model served by a running rerankd, through its native `/rerank` route."""

    def __init__(self, base_url: str, model: str, timeout_s: float = 300.0) -> None:
        self.label = model
        self._model = model
        self._client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s)

    def scores(self, query: str, documents: Sequence[str]) -> list[float]:
        response = self._client.post(
            "/rerank", json={"model": self._model, "query": query, "documents": documents}
        )
        if response.status_code != 200:
            raise RuntimeError(
                f"{self._client.base_url}/rerank answered {response.status_code}: {response.text}"
            )
        by_index = {item["index"]: item["relevance_score"] for item in response.json()["results"]}
        return [by_index[index] for index in range(len(documents))]

    def close(self) -> None:
        self._client.close()
