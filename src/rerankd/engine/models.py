"""The models a server answers for, looked up by the name a request gives."""

from __future__ import annotations

from collections.abc import Iterable

from rerankd.catalog import canonical_repo_id
from rerankd.engine.engine import RerankEngine


class UnknownModelError(LookupError):
    def __init__(self, requested: str, served: list[str]) -> None:
        super().__init__(f"model {requested!r} is not served here; served models: {served}")
        self.requested = requested
        self.served = served


class ServedModels:
    """Name -> engine. A request may name a model by its served name or by an alias of the same Hub repo;
    without a name it gets the first (default) model."""

    def __init__(self, engines: Iterable[RerankEngine]) -> None:
        self._engines: dict[str, RerankEngine] = {engine.name: engine for engine in engines}
        if not self._engines:
            raise ValueError("at least one model must be served")

    def names(self) -> list[str]:
        return list(self._engines)

    def engines(self) -> list[RerankEngine]:
        return list(self._engines.values())

    def get(self, requested: str | None) -> RerankEngine:
        if requested is None:
            return next(iter(self._engines.values()))
        if requested in self._engines:
            return self._engines[requested]
        wanted = canonical_repo_id(requested)
        for name, engine in self._engines.items():
            if canonical_repo_id(name) == wanted:
                return engine
        raise UnknownModelError(requested, self.names())

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
