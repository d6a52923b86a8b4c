"""`--dtype auto`: keep a faster precision only where the model's scores hold in it, measured at load.

On CUDA (float16) and on CPUs with bf16 units (bfloat16) the model is loaded in float32, scores the model
card's validation cases, is cast to the faster dtype and scores them again. It keeps that dtype only if every
case keeps its top-1 document and no score moves by more than `MAX_SCORE_DELTA`; otherwise it is loaded again
in float32. Elsewhere float32 is already the fastest, and nothing is measured.

The loader names the cases' pairs to the backend (`reference_pairs`), which can then load its word-embedding
table straight in the faster dtype with float32 copies of those pairs' rows only: the float32 scores are
exact, and the load's memory peak is that of the faster model, not the float32 one.
"""

from __future__ import annotations

import logging

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


def keeps_faster_precision(backend: RerankBackend, tokenizer: PairTokenizer) -> bool:
    """Cast `backend` to its faster dtype if the model holds the fidelity bound in it (see module docstring).
    False: it drifted, and the caller reloads the weights in float32 (the backend's are rounded now)."""
    candidate = backend.faster_dtype()
    if candidate is None:
        return True
    cases = builtin_cases()
    reference = case_scores(backend, tokenizer, cases)
    backend.cast(candidate)
    measured = drift(reference, case_scores(backend, tokenizer, cases))
    if measured.top1_preserved and measured.max_abs_delta <= MAX_SCORE_DELTA:
        logger.info(
            "dtype auto: %s holds (max |Δscore| %.4f vs float32, top-1 kept on every validation case)",
            candidate,
            measured.max_abs_delta,
        )
        return True
    logger.warning(
        "dtype auto: %s drifts (max |Δscore| %.4f, top-1 %s); serving float32",
        candidate,
        measured.max_abs_delta,
        "kept" if measured.top1_preserved else "changed",
    )
    return False
