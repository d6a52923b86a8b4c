"""`--dtype auto`: a faster dtype is kept only where the hardware has it and the model's scores hold in it.

CI's CPUs may or may not have bf16 units, so the hardware probe is overridden here to exercise both outcomes
of the check; the check itself (float32 scores, cast, scores again, compare) runs for real. The probe itself
is checked against the CPU flags the kernel reports.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from rerankd.backends import torch_backend
from rerankd.backends.base import BackendOptions
from rerankd.bench.machine import describe_machine
from rerankd.engine import precision
from rerankd.engine.loader import load_engine
from rerankd.engine.postprocess import sigmoid
from rerankd.fidelity import builtin_cases

QUERY, DOCUMENTS = builtin_cases()[3].queries[0]
# The real probe, taken before conftest's autouse fixture replaces it for every test.
REAL_PROBE = torch_backend.cpu_has_bf16_units
CPUINFO = Path("/proc/cpuinfo")


def logits(model_dir: Path, dtype: str) -> tuple[str, list[float]]:
    engine = load_engine(str(model_dir), options=BackendOptions(dtype=dtype))
    try:
        return engine.info.dtype, asyncio.run(engine.score(QUERY, DOCUMENTS)).logits
    finally:
        engine.close()


@pytest.mark.skipif(not CPUINFO.exists(), reason="reads the CPU flags from /proc/cpuinfo")
def test_the_probe_finds_bf16_units_where_the_cpu_flags_list_them() -> None:
    features = set(describe_machine()["cpu_features"])
    assert REAL_PROBE() == bool(features & {"avx512_bf16", "amx_tile"})


def test_auto_stays_float32_without_bf16_units(
    xsmall_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch_backend, "cpu_has_bf16_units", lambda: False)
    assert logits(xsmall_model_dir, "auto") == logits(xsmall_model_dir, "float32")


def test_auto_takes_bfloat16_where_it_holds(xsmall_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_backend, "cpu_has_bf16_units", lambda: True)
    dtype, auto = logits(xsmall_model_dir, "auto")
    assert dtype == "bfloat16"
    reference = logits(xsmall_model_dir, "float32")[1]
    assert auto != reference  # really computed in bf16 ...
    assert (
        max(abs(sigmoid(a) - sigmoid(r)) for a, r in zip(auto, reference, strict=True)) <= 0.01
    )  # ... and holds


def test_auto_falls_back_to_float32_weights_when_scores_drift(
    xsmall_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The fallback reloads the weights: float32 scores exactly, not bf16-rounded weights cast back."""
    monkeypatch.setattr(torch_backend, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(precision, "MAX_SCORE_DELTA", 0.0)
    assert logits(xsmall_model_dir, "auto") == logits(xsmall_model_dir, "float32")
    assert "bfloat16 drifts" in caplog.text


def test_explicit_dtype_is_never_second_guessed(
    xsmall_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch_backend, "cpu_has_bf16_units", lambda: True)
    assert logits(xsmall_model_dir, "float32")[0] == "float32"
