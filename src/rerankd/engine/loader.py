"""From a `--model` argument to a ready engine: resolve (local folder or Hub), load the backend, wrap it."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace

from rerankd.backends.base import RerankBackend
from rerankd.backends.registry import load_backend, plan_backend
from rerankd.engine.engine import RerankEngine, max_pair_length
from rerankd.engine.precision import keeps_faster_precision, reference_pairs
from rerankd.engine.scheduler import BatchObserver
from rerankd.engine.tokenize import PairTokenizer
from rerankd.hub import SAFETENSORS_FILES, gguf_files, resolve_model_source
from rerankd.settings import RuntimeSettings

logger = logging.getLogger(__name__)

# Antfly's variant selector: `antflydb/mxbai-rerank-base-v1:gguf:Q8_0` (also after a local folder).
GGUF_SELECTOR = re.compile(r"^(?P<reference>.+):gguf:(?P<variant>Q8_0|Q4_K|F16|F32)$", re.IGNORECASE)


def split_gguf_selector(model: str) -> tuple[str, str | None]:
    """`repo:gguf:Q8_0` -> ("repo", "Q8_0"); anything else -> (model, None)."""
    match = GGUF_SELECTOR.match(model)
    if match is None:
        return model, None
    return match["reference"], match["variant"].upper()


def load_engine(
    model: str,
    settings: RuntimeSettings | None = None,
    *,
    served_name: str | None = None,
    on_batch: BatchObserver | None = None,
    wrap_backend: Callable[[RerankBackend], RerankBackend] | None = None,
) -> RerankEngine:
    """`model` loaded as `settings` say (default: the defaults and the environment's), resolved once for the
    device it runs on and handed to the backend and the engine alike. `wrap_backend`, when given, wraps the
    loaded backend (tests inject faults through it). Raises `ModelSourceError` or `ModelLoadError` with a
    message meant for the user."""
    started = time.perf_counter()
    settings = settings or RuntimeSettings()
    reference, variant = split_gguf_selector(model)
    files = gguf_files(variant) if variant else SAFETENSORS_FILES
    source = resolve_model_source(
        reference, revision=settings.revision, cache_dir=settings.model_cache, files=files
    )
    plan = plan_backend(source.path, settings, gguf_variant=variant)
    settings = plan.settings
    auto_dtype = settings.dtype == "auto"
    backend = load_backend(plan, reference_pairs() if auto_dtype else ())
    max_length = max_pair_length(settings, backend.info)
    if auto_dtype and not keeps_faster_precision(backend, PairTokenizer(backend.tokenizer, max_length)):
        del backend  # its weights are rounded now: freed before the float32 load, not held beside it
        settings = settings.model_copy(update={"dtype": "float32"})
        backend = load_backend(replace(plan, settings=settings))
    if wrap_backend is not None:
        backend = wrap_backend(backend)
    engine = RerankEngine(served_name or model, backend, settings, on_batch=on_batch)
    logger.info(
        "loaded %s (%s, %s on %s, max length %d) in %.1fs",
        engine.name,
        backend.info.backend,
        backend.info.dtype,
        backend.info.device,
        engine.max_length,
        time.perf_counter() - started,
    )
    return engine
