"""`--dtype auto`: a faster dtype is kept only where the hardware has it and the model's scores hold in it.

CI's CPUs may or may not have bf16 units, so the hardware probe is overridden here to exercise both outcomes
of the check; the check itself (float32 scores, cast, scores again, compare) runs for real. The probe itself
is checked against the CPU flags the kernel reports and oneDNN's instruction-set cap.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from rerankd.backends import torch_backend
from rerankd.bench.machine import describe_machine
from rerankd.engine import precision
from rerankd.engine.tokenize import PairTokenizer
from rerankd.fidelity import MOCKINGBIRD, builtin_cases
from rerankd.modeling.reference_rows import Float32Rows

from conftest import engine_logits, load_backend_at, score_error, validation_scores
from memory import HAS_PROC_STATUS, load_memory

# The real probe, taken before conftest's autouse fixture replaces it for every test.
REAL_PROBE = torch_backend.cpu_has_bf16_units
CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(not CPUINFO.exists(), reason="reads the CPU flags from /proc/cpuinfo")
def test_the_probe_finds_bf16_units_where_the_cpu_flags_list_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(variable, raising=False)
    features = set(describe_machine()["cpu_features"])
    assert REAL_PROBE() == bool(features & {"avx512_bf16", "amx_tile"})


@pytest.mark.parametrize("variable", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
@pytest.mark.parametrize("isa", ["AVX2", "avx512_core", "AVX512_CORE_VNNI"])
def test_the_probe_finds_none_where_onednn_is_capped_below_them(
    monkeypatch: pytest.MonkeyPatch, variable: str, isa: str
) -> None:
    """oneDNN capped below AVX512_CORE_BF16 emulates bf16, whatever the CPU has (tests/test_kernel_paths.py
    checks the probe under each kernel path, in fresh processes)."""
    monkeypatch.setenv(variable, isa)
    assert REAL_PROBE() is False


def test_auto_stays_float32_without_bf16_units(
    xsmall_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch_backend, "cpu_has_bf16_units", lambda: False)
    assert engine_logits(xsmall_model_dir, "auto") == engine_logits(xsmall_model_dir, "float32")


# Each faster dtype `--dtype auto` tries, and the hardware probe that offers it.
FASTER_DTYPE_PROBES = {"bfloat16": "cpu_has_bf16_units", "int8": "cpu_has_int8_matmul"}


@pytest.mark.slow
@pytest.mark.parametrize("faster", sorted(FASTER_DTYPE_PROBES))
def test_auto_takes_the_faster_dtype_where_it_holds(
    xsmall_model_dir: Path, monkeypatch: pytest.MonkeyPatch, faster: str
) -> None:
    monkeypatch.setattr(torch_backend, FASTER_DTYPE_PROBES[faster], lambda: True)
    dtype, auto = engine_logits(xsmall_model_dir, "auto")
    assert dtype == faster
    reference = engine_logits(xsmall_model_dir, "float32")[1]
    assert auto != reference  # really computed in the faster dtype ...
    assert score_error(auto, reference) <= 0.01  # ... and holds


@pytest.mark.slow
@pytest.mark.parametrize("faster", sorted(FASTER_DTYPE_PROBES))
def test_auto_falls_back_to_float32_weights_when_scores_drift(
    xsmall_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, faster: str
) -> None:
    """The fallback reloads the weights: float32 scores exactly, not rounded weights cast back."""
    monkeypatch.setattr(torch_backend, FASTER_DTYPE_PROBES[faster], lambda: True)
    monkeypatch.setattr(precision, "MAX_SCORE_DELTA", 0.0)
    assert engine_logits(xsmall_model_dir, "auto") == engine_logits(xsmall_model_dir, "float32")
    assert f"{faster} drifts" in caplog.text


@pytest.mark.slow
def test_where_bf16_and_int8_both_hold_auto_serves_the_faster_measured(
    xsmall_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Both hold on this model; each is prepared as it would serve and timed on a pass of 8 x 128 tokens, and
    the faster is served."""
    for probe in ("cpu_has_bf16_units", "cpu_has_int8_matmul", "int8_may_outrun_bf16"):
        monkeypatch.setattr(torch_backend, probe, lambda: True)
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        dtype, auto = engine_logits(xsmall_model_dir, "auto")
    timed = re.search(
        r"serving (\S+), the fastest that holds \(bfloat16 ([\d.]+) s, int8 ([\d.]+) s\)", caplog.text
    )
    assert timed is not None, caplog.text
    seconds = {"bfloat16": float(timed[2]), "int8": float(timed[3])}
    # rounded in the log, so the two may print alike: rounding keeps their order, never reverses it
    assert dtype == timed[1]
    assert seconds[dtype] == min(seconds.values())
    reference = engine_logits(xsmall_model_dir, "float32")[1]
    assert auto != reference  # really computed in the faster dtype ...
    assert score_error(auto, reference) <= 0.01  # ... and holds


def test_explicit_dtype_is_never_second_guessed(
    xsmall_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch_backend, "cpu_has_bf16_units", lambda: True)
    assert engine_logits(xsmall_model_dir, "float32")[0] == "float32"


@pytest.mark.slow
def test_the_check_scores_float32_exactly_from_the_rows_of_its_own_tokens(
    xsmall_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Named the check's pairs, the backend loads its word embeddings in bf16 beside float32 copies of those
    pairs' rows. The check's float32 scores are then a whole float32 model's, bit for bit, and after the cast
    the model is the one a whole float32 load cast to bf16 gives."""
    monkeypatch.setattr(torch_backend, "cpu_has_bf16_units", lambda: True)
    split = load_backend_at(xsmall_model_dir, reference_pairs=precision.reference_pairs(), dtype="auto")
    whole = load_backend_at(xsmall_model_dir, dtype="auto")
    assert isinstance(split.model.word_embeddings, Float32Rows)
    assert split.model.word_embeddings.serving.weight.dtype == torch.bfloat16
    tokenizer = PairTokenizer(split.tokenizer, split.info.max_length)
    cases = builtin_cases()
    assert precision.case_scores(split, tokenizer, cases) == precision.case_scores(whole, tokenizer, cases)

    split.cast("bfloat16")
    whole.cast("bfloat16")
    assert isinstance(split.model.word_embeddings, torch.nn.Embedding)
    pairs = tokenizer.encode_pairs("an unrelated query", ["words the check never saw", "zebra"])
    assert split.relevance_logits(pairs) == whole.relevance_logits(pairs)


def test_a_token_the_check_did_not_name_has_no_float32_row(
    xsmall_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch_backend, "cpu_has_bf16_units", lambda: True)
    backend = load_backend_at(xsmall_model_dir, reference_pairs=(("a", "b"),), dtype="auto")
    pairs = PairTokenizer(backend.tokenizer, 512).encode_pairs(MOCKINGBIRD, ["Harper Lee"])
    with pytest.raises(ValueError, match="no float32 row"):
        backend.relevance_logits(pairs)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC_STATUS, reason="reads RSS from /proc")
def test_auto_loads_base_within_the_memory_of_bf16_not_float32(base_model_dir: Path) -> None:
    """The float32 model is never whole in memory: `--dtype auto` peaked at 1.44 GB on base when it loaded
    float32 and cast (1.72x the bf16 load), and at 1.10 GB (1.31x) with the table split."""
    auto = load_memory(base_model_dir, "auto", bf16_units=True)
    assert auto.dtype == "bfloat16"
    bf16 = load_memory(base_model_dir, "bfloat16", bf16_units=True)
    assert auto.peak < 1.5 * bf16.loaded, f"auto peaked at {auto.peak:.0f} MB; bf16 loaded, {bf16.loaded:.0f}"


def test_spread_models_score_the_validation_pairs_evenly_apart(spread_xsmall: Path) -> None:
    """`spread_scores` fits the classifier: the distinct validation pairs score at evenly spaced logits from
    0.05 to 0.95 (within the float16 checkpoint's rounding of the fitted weights), so each case's documents
    stand apart as a trained reranker's do."""
    scores = validation_scores(load_backend_at(spread_xsmall, device="cpu", dtype="float32"))
    by_pair = dict(zip(precision.reference_pairs(), (s for group in scores for s in group), strict=True))
    logits = torch.tensor(sorted(by_pair.values()), dtype=torch.float64).logit()
    low, high = torch.tensor([0.05, 0.95], dtype=torch.float64).logit().tolist()
    evenly = torch.linspace(low, high, len(logits), dtype=torch.float64)
    assert len(logits) == 14 and (logits - evenly).abs().max() < 0.01
