"""`--dtype auto`: keep a faster precision only where the model's scores hold in it, measured at load.

On CUDA (float16) and on CPUs with bf16 units or an int8 matmul the model is loaded in float32 and scores
the model card's validation cases. The backend offers rival precisions, each with its fallbacks (on a CPU
with bf16 units: bfloat16, then for DeBERTa bfloat16-mixed, against int8). Each is tried in turn: the model is
cast to it and scores the cases again, and a precision holds where every case keeps its top-1 document and
no score moves by more than `MAX_SCORE_DELTA`; where one drifts, its next fallback is tried. Where a single
rival holds, it is served. Where several do, which runs faster depends on the CPU (int8 ran 1.34x bf16 on
an AMD EPYC with AVX512-BF16, 0.90x on AMX: docs/decisions.md), so each is prepared as for serving and timed
on a pass like a served one (`timing_batch`), and the fastest is served. A cast rounds the weights, so the
model is loaded again in float32 before each next try, and float32 is served when none holds. Elsewhere
float32 is already the fastest, and nothing is measured.

The loader names the cases' pairs to the backend (`reference_pairs`), which can then load its word-embedding
table straight in the first rival's dtype with float32 copies of those pairs' rows only: the float32 scores
are exact, and where only that rival is tried the load's memory peak is that of the faster model, not the
float32 one.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from collections.abc import Callable

from rerankd.backends.base import Batch, RerankBackend
from rerankd.engine.postprocess import sigmoid
from rerankd.engine.tokenize import PairTokenizer
from rerankd.fidelity import ValidationCase, builtin_cases, drift

logger = logging.getLogger(__name__)

MAX_SCORE_DELTA = 0.01
# Where rivals race, each is timed on `TIMED_PASSES` passes of `TIMED_PAIRS` pairs of `TIMED_PAIR_TOKENS`
# tokens: a CPU pass's 1,024-token budget of passage-sized pairs.
TIMED_PAIRS = 8
TIMED_PAIR_TOKENS = 128
TIMED_PASSES = 3


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
    function holds a loaded backend, so a tried one is freed before the next load, not kept beside it."""
    backend = load_first()
    rivals = backend.faster_dtypes()
    if not rivals:
        return backend
    tokenizer = tokenizer_for(backend)
    cases = builtin_cases()
    reference = case_scores(backend, tokenizer, cases)
    race = len(rivals) > 1
    held: dict[str, float] = {}  # each rival's precision that holds: seconds of a pass like a served one
    for fallbacks in rivals:
        for candidate in fallbacks:
            if backend.info.dtype != "float32":  # the last try rounded the weights
                del backend
                backend = _load_after_freeing(load_float32)
            backend.cast(candidate)
            if race:  # timed as it would serve: on a CPU, its dense layers packed for oneDNN
                backend.prepare_for_serving()
            measured = drift(reference, case_scores(backend, tokenizer, cases))
            if measured.top1_preserved and measured.max_abs_delta <= MAX_SCORE_DELTA:
                logger.info(
                    "dtype auto: %s holds (max |Δscore| %.4f vs float32, top-1 kept on every validation "
                    "case)",
                    candidate,
                    measured.max_abs_delta,
                )
                held[candidate] = _pass_seconds(backend, timing_batch(backend)) if race else 0.0
                break
            logger.warning(
                "dtype auto: %s drifts (max |Δscore| %.4f, top-1 %s)",
                candidate,
                measured.max_abs_delta,
                "kept" if measured.top1_preserved else "changed",
            )
    if not held:
        logger.warning("dtype auto: serving float32")
        del backend
        return _load_after_freeing(load_float32)
    if not race:
        return backend
    fastest = min(held, key=held.__getitem__)
    logger.info("dtype auto: serving %s, the fastest that holds (%s)", fastest, _seconds_of(held))
    # Loaded afresh: the tried one was prepared for serving, which a cast cannot follow.
    del backend
    backend = _load_after_freeing(load_first if fastest == rivals[0][0] else load_float32)
    backend.cast(fastest)
    return backend


def _load_after_freeing(load: Callable[[], RerankBackend]) -> RerankBackend:
    """`load()`, once the backend the caller dropped is freed: one prepared for serving holds references to
    itself (its hooks), which only the garbage collector frees, and two models must never be in memory at
    once."""
    gc.collect()
    return load()


def timing_batch(backend: RerankBackend) -> Batch:
    """A pass like a served one on a CPU: the longest validation document cut to `TIMED_PAIR_TOKENS` with
    its query, `TIMED_PAIRS` times. The check's own passes, one short pair each, showed bf16 and int8 within
    4% where served batches of passages set them 1.34x apart (docs/decisions.md)."""
    tokenizer = PairTokenizer(backend.tokenizer, TIMED_PAIR_TOKENS, backend.prompt)
    query, document = max(reference_pairs(), key=lambda pair: len(pair[1]))
    return tokenizer.encode_pairs(query, [document] * TIMED_PAIRS)


def _pass_seconds(backend: RerankBackend, batch: Batch) -> float:
    """Median seconds of `TIMED_PASSES` passes of `batch`, after one that builds its kernels."""
    backend.relevance_logits(batch)
    seconds = []
    for _ in range(TIMED_PASSES):
        started = time.perf_counter()
        backend.relevance_logits(batch)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def _seconds_of(held: dict[str, float]) -> str:
    return ", ".join(f"{dtype} {seconds:.3f} s" for dtype, seconds in held.items())
