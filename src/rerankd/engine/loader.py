"""From a `--model` argument to a ready engine: resolve (local folder or Hub), load the backend, wrap it."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import replace
from pathlib import Path

from rerankd.backends.base import BackendOptions
from rerankd.backends.registry import load_backend
from rerankd.devtools.faults import FAULT_MARKER_ENV, FaultInjectingBackend
from rerankd.engine.engine import EngineLimits, RerankEngine
from rerankd.engine.precision import keeps_faster_precision, reference_pairs
from rerankd.engine.scheduler import BatchLimits, BatchObserver
from rerankd.engine.tokenize import PairTokenizer
from rerankd.hub import SAFETENSORS_FILES, gguf_files, resolve_model_source

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
    *,
    served_name: str | None = None,
    revision: str | None = None,
    cache_dir: Path = Path("models"),
    options: BackendOptions | None = None,
    max_length: int | None = None,
    batching: BatchLimits | None = None,
    on_batch: BatchObserver | None = None,
) -> RerankEngine:
    """Raises `ModelSourceError` or `ModelLoadError` with a message meant for the user."""
    started = time.perf_counter()
    reference, variant = split_gguf_selector(model)
    files = gguf_files(variant) if variant else SAFETENSORS_FILES
    source = resolve_model_source(reference, revision=revision, cache_dir=cache_dir, files=files)
    batching = batching or BatchLimits()
    options = replace(
        options or BackendOptions(),
        batch_tokens=batching.max_batch_tokens,
        batch_pairs=batching.max_batch_pairs,
    )
    if options.dtype == "auto":
        options = replace(options, reference_pairs=reference_pairs())
    backend = load_backend(source.path, options, gguf_variant=variant)
    if os.environ.get(FAULT_MARKER_ENV):
        backend = FaultInjectingBackend(backend, os.environ[FAULT_MARKER_ENV])
    limits = EngineLimits(
        max_length=min(max_length or backend.info.max_length, backend.info.max_length),
        batching=batching,
    )
    if options.dtype == "auto" and not keeps_faster_precision(
        backend, PairTokenizer(backend.tokenizer, limits.max_length)
    ):
        del backend  # its weights are rounded now: freed before the float32 load, not held beside it
        backend = load_backend(source.path, replace(options, dtype="float32"), gguf_variant=variant)
    engine = RerankEngine(served_name or model, backend, limits, on_batch=on_batch)
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
