"""From a `--model` argument to a ready engine: resolve (local folder or Hub), load the backend, wrap it."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace

from rerankd.backends.base import RerankBackend
from rerankd.backends.onnx_backend import ONNX_RUNTIMES
from rerankd.backends.registry import FileVariant, load_backend, plan_backend
from rerankd.engine.engine import RerankEngine, max_pair_length
from rerankd.engine.precision import load_in_auto_precision, reference_pairs
from rerankd.engine.scheduler import BatchObserver
from rerankd.engine.tokenize import PairTokenizer
from rerankd.formats.onnx_graph import onnx_file_name
from rerankd.hub import (
    SAFETENSORS_FILES,
    FileSelection,
    ModelSource,
    gguf_files,
    onnx_files,
    resolve_model_source,
)
from rerankd.settings import RuntimeSettings

logger = logging.getLogger(__name__)

# Variant selectors (also after a local folder): `antflydb/mxbai-rerank-base-v1:gguf:Q8_0` (Antfly's),
# `mixedbread-ai/mxbai-rerank-xsmall-v1:onnx` (onnx/model.onnx), `…:onnx:int8` (onnx/model_int8.onnx).
GGUF_SELECTOR = re.compile(r"^(?P<reference>.+):gguf:(?P<variant>Q8_0|Q4_K|F16|F32)$", re.IGNORECASE)
ONNX_SELECTOR = re.compile(r"^(?P<reference>.+):onnx(?::(?P<variant>[a-z0-9]+))?$", re.IGNORECASE)


def split_selector(model: str) -> tuple[str, FileVariant | None]:
    """`repo:gguf:Q8_0` -> ("repo", GGUF variant Q8_0); `repo:onnx:int8` -> ("repo", ONNX variant int8);
    `repo:onnx` -> ("repo", the float32 ONNX graph); anything else -> (model, None)."""
    match = GGUF_SELECTOR.match(model)
    if match is not None:
        return match["reference"], FileVariant("gguf", match["variant"].upper())
    match = ONNX_SELECTOR.match(model)
    if match is not None:
        variant = match["variant"]
        return match["reference"], FileVariant("onnx", None if variant is None else variant.lower())
    return model, None


def files_to_fetch(variant: FileVariant | None, backend: str) -> FileSelection:
    """What to download of a Hub repo: the selected GGUF or ONNX file and its sidecars, the float32 ONNX
    graph for an ONNX runtime asked for without a selector, else the safetensors checkpoint."""
    if variant is not None and variant.format == "gguf":
        return gguf_files(variant.name or "")
    if variant is not None or backend in ONNX_RUNTIMES:
        return onnx_files(onnx_file_name(None if variant is None else variant.name))
    return SAFETENSORS_FILES


def fetch_model_files(model: str, settings: RuntimeSettings) -> ModelSource:
    """The files of `model` its backend loads, as `settings` pick them (revision, cache, backend): a local
    path as it is, a Hub repo downloaded into the cache (or found there) at one verified commit. One function
    for `load_engine` and `rerankd download`, so that a download fetches exactly what serving loads."""
    reference, variant = split_selector(model)
    return resolve_model_source(
        reference,
        revision=settings.revision,
        cache_dir=settings.model_cache,
        files=files_to_fetch(variant, settings.backend),
    )


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
    source = fetch_model_files(model, settings)
    plan = plan_backend(source.path, settings, split_selector(model)[1])
    settings = plan.settings
    if settings.dtype == "auto":
        float32 = replace(plan, settings=settings.model_copy(update={"dtype": "float32"}))
        backend = load_in_auto_precision(
            lambda: load_backend(plan, reference_pairs()),
            lambda: load_backend(float32),
            lambda loaded: PairTokenizer(loaded.tokenizer, max_pair_length(settings, loaded.info)),
        )
    else:
        backend = load_backend(plan)
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
