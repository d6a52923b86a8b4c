"""Parity, bf16, bf16-mixed and int8 precision and the `--dtype auto` probe under the kernel paths of every
CPU these tests run on, forced on this one: a change that only breaks on an AVX2 or an AMX machine fails
wherever CI runs.

Each path runs tests/parity.py in a fresh process (torch reads `ATEN_CPU_CAPABILITY`, and MKL and oneDNN
read theirs, once, when first used), on one shared case whose float64 truth is computed here once. A path
above what this CPU has runs the highest it has, and says so. The paths run side by side, one thread each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from rerankd.bench.machine import describe_machine
from rerankd.engine.precision import MAX_SCORE_DELTA
from rerankd.modeling.quantized import INT7_LEVELS

from parity import MUTANTS, KernelPathCase, TruthErrors

pytestmark = pytest.mark.slow

# ATEN_CPU_CAPABILITY picks torch's own vectorized kernels, MKL_ENABLE_INSTRUCTIONS the float32 matmuls
# the reference runs, ONEDNN_MAX_CPU_ISA those of the dense layers we pack (and whether bf16 runs on bf16
# units).
KERNEL_PATHS = {
    "unvectorized": {
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
    },
    "AVX2 only (AMD EPYC)": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
    "AVX-512 without bf16": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
    },
    "AVX512-BF16 (AMD EPYC)": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
    },
    "AMX (Intel Sapphire Rapids)": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"},
}
PATHS_WITH_BF16_UNITS = {"AVX512-BF16 (AMD EPYC)", "AMX (Intel Sapphire Rapids)"}
PATHS_WITH_VNNI = PATHS_WITH_BF16_UNITS  # oneDNN's AVX512_CORE_BF16 and AMX ISAs include VNNI
CPU_FEATURES = set(describe_machine()["cpu_features"])
CPU_HAS_BF16_UNITS = bool({"avx512_bf16", "amx_tile"} & CPU_FEATURES)
# MKL and oneDNN take their setting as a ceiling, but torch runs the kernels ATEN_CPU_CAPABILITY names even
# where the CPU lacks them (an illegal instruction on an AVX2-only EPYC): capped at what this CPU has.
HIGHEST_ATEN_CAPABILITY = (
    "avx512" if "avx512f" in CPU_FEATURES else "avx2" if "avx2" in CPU_FEATURES else "default"
)
ATEN_CAPABILITIES = ["default", "avx2", "avx512"]


def runnable(path: dict[str, str]) -> dict[str, str]:
    """A path's settings with torch's capability capped at this CPU's."""
    wanted = path["ATEN_CPU_CAPABILITY"]
    highest = ATEN_CAPABILITIES.index(HIGHEST_ATEN_CAPABILITY)
    return {**path, "ATEN_CPU_CAPABILITY": ATEN_CAPABILITIES[min(ATEN_CAPABILITIES.index(wanted), highest)]}


SETTINGS = {name for path in KERNEL_PATHS.values() for name in path} | {"DNNL_MAX_CPU_ISA"}


def measure(case: Path, path: str) -> dict:
    env = {name: value for name, value in os.environ.items() if name not in SETTINGS}
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "parity.py"), str(case)],
        env={**env, **runnable(KERNEL_PATHS[path]), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@pytest.fixture(scope="module")
def reports(module_folder: Callable[[str], Path]) -> dict[str, Future[dict]]:
    """Every path's measurements, running as many at a time as there are cores."""
    case = module_folder("kernel-paths") / "case.pt"
    KernelPathCase.build().save(case)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        yield {path: pool.submit(measure, case, path) for path in KERNEL_PATHS}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", sorted(KERNEL_PATHS))
def test_parity_precision_and_probe_hold_on_every_kernel_path(
    reports: dict[str, Future[dict]], path: str
) -> None:
    measured = reports[path].result()
    errors = {name: TruthErrors(**values) for name, values in measured["errors"].items()}
    print(f"\n{path} (torch kernels: {measured['aten_cpu_capability']}):")
    for name, error in errors.items():
        print(f"  {name}: {error}")
    print(f"  bf16 max |Δscore| {measured['bf16_score_drift']:.2e}; bf16 units: {measured['bf16_units']}")
    print(f"  bf16-mixed max |Δscore| {measured['mixed_score_drift']:.2e}")
    int8 = measured["int8"]
    print(f"  int8 max |Δscore| {int8['drift']:.2e}, weights of ±{int8['weight_levels']}")

    for name in ("float32", "float32, packed for oneDNN"):
        assert errors[name].holds, f"{path}, {name}: {errors[name]}"
    for name in MUTANTS:
        assert not errors[name].holds, f"{path}: the mutant '{name}' passed: {errors[name]}"
    assert measured["bf16_score_drift"] <= MAX_SCORE_DELTA
    assert measured["mixed_score_drift"] <= MAX_SCORE_DELTA
    assert int8["drift"] <= MAX_SCORE_DELTA
    # Without VNNI oneDNN's int8 sums saturate at 8-bit weights: capped below it, the probe takes 7 bits.
    if path not in PATHS_WITH_VNNI:
        assert int8["weight_levels"] == INT7_LEVELS
    # The probe keeps bf16 only where oneDNN may use bf16 units: never when it is capped below them.
    assert measured["bf16_units"] == (CPU_HAS_BF16_UNITS and path in PATHS_WITH_BF16_UNITS)
