"""`--dtype auto`: keep a faster precision only where the model's scores hold in it, measured at load.

On CUDA (float16) and on CPUs with bf16 units (bfloat16, then for DeBERTa bfloat16-mixed) the model is
loaded in float32 and scores the model card's validation cases. Each faster precision the backend offers is
then tried, fastest first: the model is cast to it and scores the cases again, and the first that keeps every
case's top-1 document and moves no score by more than `MAX_SCORE_DELTA` is served. A cast rounds the weights,
so after a precision that drifted the model is loaded again in float32 before the next is tried, and
float32 is served when none holds. Elsewhere float32 is already the fastest, and nothing is measured.

The loader names the cases' pairs to the backend (`reference_pairs`), which can then load its word-embedding
table straight in the first faster dtype with float32 copies of those pairs' rows only: the float32 scores
are exact, and the load's memory peak is that of the faster model, not the float32 one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from rerankd.backends.base import Batch, RerankBackend
from rerankd.engine.postprocess import sigmoid
from rerankd.engine.tokenize import PairTokenizer
from rerankd.fidelity import ValidationCase, builtin_cases, drift

logger = logging.getLogger(__name__)

MAX_SCORE_DELTA = 0.01


def reference_pairs() -> tuple[tuple[str, str], ...]:
    """Every (query, document) pair the check scores."""
    return tuple(
        (query, document)
        for case in builtin_cases()
        for query, documents in case.queries
        for document in documents
    )


def case_scores(
    backend: RerankBackend, tokenizer: PairTokenizer, cases: list[ValidationCase]
) -> list[list[float]]:
    """Relevance of every (query, documents) group of `cases`, flattened in order. One pair per pass: the
    float32 pass then needs the least memory (docs/decisions.md)."""
    return [
        [
            sigmoid(backend.relevance_logits(Batch([pair]))[0])
            for pair in tokenizer.encode_pairs(query, documents).pairs
        ]
        for case in cases
        for query, documents in case.queries
    ]


def load_in_auto_precision(
    load_first: Callable[[], RerankBackend],
    load_float32: Callable[[], RerankBackend],
    tokenizer_for: Callable[[RerankBackend], PairTokenizer],
) -> RerankBackend:
    """The backend in the fastest precision the model holds in (see the module docstring). `load_first`
    loads it for the check (named `reference_pairs`), `load_float32` again in plain float32. Only this
    function holds a loaded backend, so a drifted one is freed before the next load, not kept beside it."""
    backend = load_first()
    candidates = backend.faster_dtypes()
    if not candidates:
        return backend
    tokenizer = tokenizer_for(backend)
    cases = builtin_cases()
    reference = case_scores(backend, tokenizer, cases)
    for candidate in candidates:
        if backend.info.dtype != "float32":  # the last candidate rounded the weights
            del backend
            backend = load_float32()
        backend.cast(candidate)
        measured = drift(reference, case_scores(backend, tokenizer, cases))
        if measured.top1_preserved and measured.max_abs_delta <= MAX_SCORE_DELTA:
            logger.info(
                "dtype auto: %s holds (max |Δscore| %.4f vs float32, top-1 kept on every validation case)",
                candidate,
                measured.max_abs_delta,
            )
            return backend
        logger.warning(
            "dtype auto: %s drifts (max |Δscore| %.4f, top-1 %s)",
            candidate,
            measured.max_abs_delta,
            "kept" if measured.top1_preserved else "changed",
        )
    del backend
    logger.warning("dtype auto: serving float32")
    return load_float32()
