"""From a `--model` argument to a ready engine: resolve (local folder or Hub), load the backend, wrap it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rerankd.backends.base import BackendOptions
from rerankd.backends.registry import load_backend
from rerankd.engine.engine import EngineLimits, RerankEngine
from rerankd.engine.scheduler import BatchLimits
from rerankd.hub import resolve_model_source

logger = logging.getLogger(__name__)


def load_engine(
    model: str,
    *,
    served_name: str | None = None,
    revision: str | None = None,
    cache_dir: Path = Path("models"),
    options: BackendOptions | None = None,
    max_length: int | None = None,
    batching: BatchLimits | None = None,
) -> RerankEngine:
    """Raises `ModelSourceError` or `ModelLoadError` with a message meant for the user."""
    started = time.perf_counter()
    source = resolve_model_source(model, revision=revision, cache_dir=cache_dir)
    backend = load_backend(source.path, options or BackendOptions())
    limits = EngineLimits(
        max_length=min(max_length or backend.info.max_length, backend.info.max_length),
        batching=batching or BatchLimits(),
    )
    engine = RerankEngine(served_name or model, backend, limits)
    logger.info(
        "loaded %s (%s, %s on %s, max length %d) in %.1fs",
        engine.name,
        backend.info.backend,
        backend.info.dtype,
        backend.info.device,
        limits.max_length,
        time.perf_counter() - started,
    )
    return engine
