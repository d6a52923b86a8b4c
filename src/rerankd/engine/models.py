"""The models a server answers for: each one's load state, looked up by the name a request gives.

A server starts listening before its models are loaded (so `/health` and `/ready` can answer while a large
model downloads); `load_all` loads and warms them one after another in a background thread. A model that
fails to load keeps its reason, stays failed until the server restarts, and the others still serve.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from rerankd.catalog import canonical_repo_id
from rerankd.engine.engine import RerankEngine

logger = logging.getLogger(__name__)

ModelState = Literal["loading", "ready", "failed"]
# What `/ready` says of the server as a whole (see `ServedModels.readiness`).
ServingStatus = Literal["ready", "degraded", "loading", "unhealthy", "failed"]
EngineLoader = Callable[[str, str], RerankEngine]  # (served name, model reference) -> engine


class UnknownModelError(LookupError):
    def __init__(self, requested: str, served: list[str]) -> None:
        super().__init__(f"model {requested!r} is not served here; served models: {served}")
        self.requested = requested
        self.served = served


class ModelNotReadyError(LookupError):
    """The model is still loading (retry later) or failed to load (`permanent`: no retry helps)."""

    def __init__(self, name: str, state: ModelState) -> None:
        # The reason (which may name server paths) goes to the log and keyed /ready, not to every client.
        detail = (
            "is still loading; retry shortly"
            if state == "loading"
            else "failed to load; it will not become available until the server restarts (the reason is in "
            "the server's log and /ready)"
        )
        super().__init__(f"model {name!r} {detail}")
        self.state = state

    @property
    def permanent(self) -> bool:
        return self.state == "failed"


@dataclass(frozen=True)
class ServerReadiness:
    """Whether the server should get traffic, and each model's part in it (see `ServedModels.readiness`)."""

    serving: list[str]
    pending: list[str]  # still loading
    failed: dict[str, str]  # failed to load, or loaded and unhealthy: why
    unhealthy: bool  # a loaded model's backend reports a problem

    @property
    def status(self) -> ServingStatus:
        if self.pending:
            return "loading"
        if self.unhealthy:
            return "unhealthy"
        if not self.serving:
            return "failed"
        return "degraded" if self.failed else "ready"

    @property
    def takes_traffic(self) -> bool:
        return self.status in ("ready", "degraded")

    @property
    def may_change(self) -> bool:
        """Whether asking again may give another answer: a model still loading, a backend that may recover."""
        return self.status in ("loading", "unhealthy")


@dataclass
class ModelSlot:
    name: str
    reference: str
    state: ModelState = "loading"
    engine: RerankEngine | None = None
    error: str | None = None
    load_seconds: float | None = None


class ServedModels:
    """Name -> model slot. A request may name a model by its served name or by an alias of the same Hub repo;
    without a name it gets the first (default) model."""

    def __init__(self, slots: Iterable[ModelSlot]) -> None:
        self._slots: dict[str, ModelSlot] = {}
        for slot in slots:
            if slot.name in self._slots:
                raise ValueError(f"two models are served as {slot.name!r}; name them apart with name=model")
            self._slots[slot.name] = slot
        if not self._slots:
            raise ValueError("at least one model must be served")
        self._closed = threading.Event()

    @classmethod
    def of(cls, engines: Iterable[RerankEngine]) -> ServedModels:
        """Already-loaded engines, all ready."""
        return cls(ModelSlot(engine.name, engine.name, "ready", engine) for engine in engines)

    @classmethod
    def pending(cls, models: Iterable[tuple[str, str]]) -> ServedModels:
        """(served name, reference) pairs still to be loaded by `load_all`."""
        return cls(ModelSlot(name, reference) for name, reference in models)

    def names(self) -> list[str]:
        return list(self._slots)

    def slots(self) -> list[ModelSlot]:
        return list(self._slots.values())

    def engines(self) -> list[RerankEngine]:
        """The engines of the models that are ready."""
        return [slot.engine for slot in self._slots.values() if slot.engine is not None]

    def readiness(self) -> ServerReadiness:
        """`ready` when every model serves; `degraded` when every model has finished loading, some failed
        (for good, until a restart) and the rest serve: the server takes traffic for those, as a Kubernetes
        pod whose other models still answer should. `loading` while a model loads and `unhealthy` while a
        loaded model's backend reports a problem: both may change. `failed` when no model serves."""
        serving: list[str] = []
        pending: list[str] = []
        failed: dict[str, str] = {}
        unhealthy = False
        for slot in self._slots.values():
            if slot.state == "loading":
                pending.append(slot.name)
            elif slot.engine is None:
                failed[slot.name] = slot.error or "failed to load"
            elif (problem := slot.engine.health()) is not None:
                failed[slot.name], unhealthy = f"unhealthy: {problem}", True
            else:
                serving.append(slot.name)
        return ServerReadiness(serving, pending, failed, unhealthy)

    def _slot(self, requested: str | None) -> ModelSlot:
        if requested is None:
            return next(iter(self._slots.values()))
        if requested in self._slots:
            return self._slots[requested]
        wanted = canonical_repo_id(requested)
        for name, slot in self._slots.items():
            if canonical_repo_id(name) == wanted:
                return slot
        raise UnknownModelError(requested, self.names())

    def get(self, requested: str | None) -> RerankEngine:
        slot = self._slot(requested)
        if slot.engine is None:
            raise ModelNotReadyError(slot.name, slot.state)
        return slot.engine

    def load_all(self, load: EngineLoader, warmup: bool = True) -> None:
        """Load (and warm up) every pending model in turn; failures are kept, not raised."""
        for slot in self._slots.values():
            if slot.state != "loading" or self._closed.is_set():
                continue
            started = time.perf_counter()
            try:
                engine = _loaded(load, slot, warmup)
            except Exception as error:  # any failure is this model's, reported by /ready and its requests
                slot.state, slot.error = "failed", str(error) or type(error).__name__
                logger.error("model %s (%s) failed to load: %s", slot.name, slot.reference, slot.error)
                continue
            if self._closed.is_set():
                engine.close()
                return
            slot.engine, slot.load_seconds, slot.state = engine, time.perf_counter() - started, "ready"
            logger.info("model %s ready after %.1fs", slot.name, slot.load_seconds)

    def close(self) -> None:
        self._closed.set()
        for slot in self._slots.values():
            if slot.engine is not None:
                slot.engine.close()


def _loaded(load: EngineLoader, slot: ModelSlot, warmup: bool) -> RerankEngine:
    """The slot's engine, warmed up; one that fails its warm-up (broken weights) is closed, its threads and
    weights freed, since it will never serve."""
    engine = load(slot.name, slot.reference)
    if warmup:
        try:
            engine.warm_up()
        except BaseException:
            engine.close()
            raise
    return engine
