"""`--dtype int8`: the repeated layers' dense layers in int8 through oneDNN on a CPU (per-channel weights,
inputs quantized per call), the rest in float32; `--dtype auto` keeps it only where the model's scores hold
(tests/test_precision.py runs that check for int8 as for bf16).

Every kernel path's int8 drift from the float64 truth, and the weight width its sums allow, are checked by
tests/test_kernel_paths.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rerankd.backends import torch_backend
from rerankd.backends.base import ModelLoadError
from rerankd.backends.registry import FileVariant
from rerankd.backends.torch_backend import layer_stack, resolve_dtype
from rerankd.engine import precision
from rerankd.fidelity import builtin_cases, drift
from rerankd.modeling.quantized import (
    INT7_LEVELS,
    UINT8_MAX,
    Int8Linear,
    int8_available,
    int8_dense_speedup,
    quantize_activations,
    weight_levels,
)

from conftest import engine_logits, load_backend_at, validation_scores
from serving import run_cli

pytestmark = pytest.mark.skipif(not int8_available(), reason="this torch has no oneDNN int8 matmul")


def saturating_case() -> tuple[nn.Linear, torch.Tensor]:
    """Every weight and (but one) input at the top of its range: pairs of products past int16."""
    linear = nn.Linear(256, 8)
    with torch.no_grad():
        linear.weight.fill_(0.5)
        linear.bias.zero_()
    inputs = torch.ones(3, 256)
    inputs[0, 0] = 0.0
    return linear, inputs


@pytest.mark.parametrize("shift", [0.0, 1.0, -1.0])
def test_activations_quantize_to_the_nearest_level_and_zero_exactly(shift: float) -> None:
    """Asymmetric over the range widened to hold zero: every value within half a level of its float, zero
    (padding) exactly at the zero point; the same levels as dividing, rounding and shifting op by op."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(97, 3072, generator=generator) * 0.3 + shift
    inputs[5, :7] = 0.0
    scale, zero_point, levels = quantize_activations(inputs)
    assert levels.dtype == torch.uint8 and levels.shape == inputs.shape
    low, high = min(inputs.min().item(), 0.0), max(inputs.max().item(), 0.0)
    assert scale == pytest.approx((high - low) / UINT8_MAX, rel=1e-12)
    restored = (levels.double() - zero_point) * scale
    assert (restored - inputs.double()).abs().max() <= scale * (0.5 + 1e-4)
    assert (levels[5, :7] == zero_point).all()
    op_by_op = (inputs / scale).round().add(zero_point).clamp(0, UINT8_MAX)
    assert (op_by_op - levels.float()).abs().max() <= 1  # a tie may round the other way


def test_an_all_zero_input_quantizes_to_zeros() -> None:
    scale, zero_point, levels = quantize_activations(torch.zeros(4, 16))
    assert scale > 0 and zero_point == 0 and not levels.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int8_layer_gives_float32s_result_within_int8_rounding_in_its_inputs_dtype(
    dtype: torch.dtype,
) -> None:
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(768, 256)
    inputs = torch.randn(64, 768, generator=generator).to(dtype)
    with torch.inference_mode():
        exact = linear(inputs.float())
        result = Int8Linear(linear, 64, weight_levels())(inputs)
        error = (result.float() - exact).abs().max() / exact.abs().max()
    assert result.dtype == dtype
    assert 0 < error < 0.03


def test_the_sums_never_saturate_at_the_weight_width_the_probe_takes() -> None:
    linear, inputs = saturating_case()
    with torch.inference_mode():
        assert torch.allclose(Int8Linear(linear, 3, weight_levels())(inputs), linear(inputs), rtol=0.01)


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE"])
def test_without_vnni_the_weights_take_seven_bits(isa: str) -> None:
    """oneDNN capped below VNNI (as on an AVX2-only EPYC) sums pairs of products in int16: 8-bit weights
    saturate there (the result comes out about half), so the probe takes 7."""
    script = (
        "import torch\n"
        "from rerankd.modeling.quantized import Int8Linear, weight_levels, INT8_LEVELS\n"
        "from test_int8 import saturating_case\n"
        "linear, inputs = saturating_case()\n"
        "with torch.inference_mode():\n"
        "    exact = linear(inputs)\n"
        "    eight = Int8Linear(linear, 3, INT8_LEVELS)(inputs)\n"
        "print(weight_levels(), float((eight / exact).min()))\n"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa, "PYTHONPATH": str(Path(__file__).parent)}
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    levels, ratio = completed.stdout.split()
    assert int(levels) == INT7_LEVELS
    assert float(ratio) < 0.9  # what 8-bit weights would have given


def test_int8_quantizes_the_layers_and_keeps_the_head_in_float32(xsmall_model_dir: Path) -> None:
    backend = load_backend_at(xsmall_model_dir, device="cpu", dtype="int8")
    assert backend.info.dtype == "int8"
    for layer in layer_stack(backend.model):
        dense = [module for module in layer.modules() if isinstance(module, nn.Linear | Int8Linear)]
        assert dense and all(isinstance(module, Int8Linear) for module in dense)
    assert type(backend.model.classifier) is nn.Linear
    assert backend.model.classifier.weight.dtype == torch.float32


def test_with_bf16_units_int8_computes_attention_and_activations_in_bf16(
    xsmall_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU with bf16 units, int8's dense layers write bf16 and attention runs in bf16 around the float32
    residual stream (as bf16-mixed's), within the auto bound of the float64 truth (why: docs/decisions.md).
    Without them, attention stays float32."""
    reference = load_backend_at(xsmall_model_dir, device="cpu", dtype="float32")
    reference.model.to(torch.float64)
    truth = validation_scores(reference)
    plain = load_backend_at(xsmall_model_dir, device="cpu", dtype="int8")
    assert all(layer.compute_dtype is None for layer in layer_stack(plain.model))
    monkeypatch.setattr(torch_backend, "cpu_has_bf16_units", lambda: True)
    backend = load_backend_at(xsmall_model_dir, device="cpu", dtype="int8")
    for layer in layer_stack(backend.model):
        assert layer.compute_dtype == torch.bfloat16 and layer.relative_keys.dtype == torch.bfloat16
        assert layer.attention_norm.weight.dtype == torch.float32
    measured = drift(truth, validation_scores(backend))
    assert measured.top1_preserved and 0 < measured.max_abs_delta <= precision.MAX_SCORE_DELTA


def test_validate_reports_int8_drift_within_the_auto_bound_and_onnx_runtimes_int8(
    xsmall_model_dir: Path, xsmall_onnx: Path
) -> None:
    """`rerankd validate --compare-dtypes int8` against float32, beside ONNX Runtime's dynamic int8 export
    of the same model: ours keeps every top-1 within auto's bound, and drifts no more than twice as far as
    the field's int8 (measured here: 0.0011 against 0.0018 on a random xsmall)."""
    completed = run_cli(
        "validate",
        str(xsmall_model_dir),
        f"{xsmall_onnx}:onnx:int8",
        "--compare-dtypes",
        "int8",
        "--dtype",
        "float32",
        "--json",
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout)["results"]
    ours = [result for result in results if result["variant"].endswith("(int8)")]
    theirs = [result for result in results if result["variant"].endswith(":onnx:int8")]
    assert len(ours) == len(theirs) == len(builtin_cases())
    assert all(result["top1_preserved"] for result in ours)
    ours_drift = max(result["max_abs_delta"] for result in ours)
    theirs_drift = max(result["max_abs_delta"] for result in theirs)
    assert 0 < ours_drift <= precision.MAX_SCORE_DELTA
    assert ours_drift <= 2 * theirs_drift


def test_auto_races_int8_against_bf16_only_where_its_dense_layers_may_outrun_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch_backend, "cpu_has_int8_matmul", lambda: True)
    monkeypatch.setattr(torch_backend, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(torch_backend, "int8_dense_speedup", lambda: torch_backend.MIN_INT8_DENSE_SPEEDUP)
    cpu = torch.device("cpu")
    assert torch_backend.faster_dtypes_on(cpu) == (("bfloat16",), ("int8",))
    assert torch_backend.faster_dtypes_on(cpu, mixes=True) == (("bfloat16", "bfloat16-mixed"), ("int8",))
    monkeypatch.setattr(
        torch_backend, "int8_dense_speedup", lambda: 0.99 * torch_backend.MIN_INT8_DENSE_SPEEDUP
    )
    assert torch_backend.faster_dtypes_on(cpu, mixes=True) == (("bfloat16", "bfloat16-mixed"),)
    monkeypatch.setattr(torch_backend, "cpu_has_bf16_units", lambda: False)
    assert torch_backend.faster_dtypes_on(cpu, mixes=True) == (("int8",),)
    assert torch_backend.faster_dtypes_on(torch.device("cuda"), mixes=True) == (("float16",),)


def test_the_int8_speed_probe_times_both_layers() -> None:
    """A ratio of two real timings (its value depends on the CPU, so only its sanity is checked)."""
    speedup = int8_dense_speedup()
    assert math.isfinite(speedup) and speedup > 0


def test_int8_is_refused_off_the_cpu_and_by_openvino(xsmall_onnx: Path) -> None:
    with pytest.raises(ModelLoadError, match="--dtype int8 runs on a CPU"):
        resolve_dtype("int8", torch.device("cuda"))
    with pytest.raises(ModelLoadError, match="OpenVINO takes --dtype as its precision hint"):
        load_backend_at(xsmall_onnx, backend="openvino", dtype="int8")


def test_onnx_runtime_serves_its_int8_graph_under_dtype_int8(xsmall_onnx: Path) -> None:
    backend = load_backend_at(xsmall_onnx, FileVariant("onnx", "int8"), backend="onnx", dtype="int8")
    assert backend.info.backend == "onnx"
    with pytest.raises(ModelLoadError, match="in the precision it was exported in"):
        load_backend_at(xsmall_onnx, backend="onnx", dtype="int8")


@pytest.mark.slow
def test_auto_serves_float32_where_int8_moves_spread_scores_past_the_bound(
    spread_xsmall: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Near-tie scores barely move under any precision; spread ones do. On this model int8 moved a score by
    0.07-0.21 (ONNX Runtime's int8 of it: 0.37), so auto's check refuses it and serves float32."""
    backend = load_backend_at(spread_xsmall, device="cpu", dtype="float32")
    scores = [score for group in validation_scores(backend) for score in group]
    assert min(scores) == pytest.approx(0.05, abs=1e-3) and max(scores) == pytest.approx(0.95, abs=1e-3)
    monkeypatch.setattr(torch_backend, "cpu_has_int8_matmul", lambda: True)
    with caplog.at_level(logging.WARNING):
        assert engine_logits(spread_xsmall, "auto") == engine_logits(spread_xsmall, "float32")
    assert "int8 drifts" in caplog.text
