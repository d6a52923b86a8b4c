"""`--dtype auto`: keep a faster precision only where the model's scores hold in it, measured at load.

On CUDA (float16) and on CPUs with bf16 units (bfloat16) the model is loaded in float32, scores the model
card's validation cases, is cast to the faster dtype and scores them again. It keeps that dtype only if every
case keeps its top-1 document and no score moves by more than `MAX_SCORE_DELTA`; otherwise it is loaded again
in float32. Elsewhere float32 is already the fastest, and nothing is measured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from rerankd.backends.base import RerankBackend
from rerankd.engine.postprocess import sigmoid
from rerankd.engine.tokenize import PairTokenizer
from rerankd.fidelity import ValidationCase, builtin_cases, drift

logger = logging.getLogger(__name__)

MAX_SCORE_DELTA = 0.01


def case_scores(
    backend: RerankBackend, tokenizer: PairTokenizer, cases: list[ValidationCase]
) -> list[list[float]]:
    """Relevance of every (query, documents) group of `cases`, flattened in order, one group per batch."""
    return [
        [sigmoid(logit) for logit in backend.relevance_logits(tokenizer.encode_pairs(query, documents))]
        for case in cases
        for query, documents in case.queries
    ]


def settle_auto_precision(
    backend: RerankBackend, tokenizer: PairTokenizer, reload_float32: Callable[[], RerankBackend]
) -> RerankBackend:
    """The backend in the fastest dtype that holds the fidelity bound (see module docstring)."""
    candidate = backend.faster_dtype()
    if candidate is None:
        return backend
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
        return backend
    logger.warning(
        "dtype auto: %s drifts (max |Δscore| %.4f, top-1 %s); serving float32",
        candidate,
        measured.max_abs_delta,
        "kept" if measured.top1_preserved else "changed",
    )
    return reload_float32()
