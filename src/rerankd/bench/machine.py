"""What the benchmark ran on: CPU model and features, cores, library versions, and matmul throughput."""

from __future__ import annotations

import itertools
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rerankd.modeling.onednn import pack_dense_layers
from rerankd.modeling.quantized import Int8Linear, weight_levels

INTERESTING_FLAGS = (
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def describe_machine() -> dict[str, object]:
    flags = (_cpuinfo_field("flags") or "").split()
    return {
        "cpu": _cpuinfo_field("model name") or platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "cpu_features": [flag for flag in INTERESTING_FLAGS if flag in flags],
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def matmul_gflops(
    dtype: torch.dtype,
    shape: tuple[int, int, int],
    seconds: float = 1.5,
    device: str = "cpu",
) -> float:
    """Best GFLOP/s of an (M×K)·(K×N) product, `shape` = (M, K, N), as a dense layer computes it: by
    `nn.Linear` (what the peers run) and, on a CPU, by rerankd's oneDNN-packed layer too, whichever is the
    faster. That is the ceiling the model's dense layers run against on this machine: on an AMD EPYC torch
    hands float32 to MKL, at under half oneDNN's rate there (docs/decisions.md)."""
    rows, inner, cols = shape
    inputs = torch.randn(rows, inner, device=device).to(dtype)
    layer = torch.nn.Sequential(torch.nn.Linear(inner, cols, bias=False)).to(device, dtype)

    def product() -> None:
        layer(inputs)
        if device != "cpu":
            torch.cuda.synchronize()

    operations = 2 * rows * inner * cols
    with torch.inference_mode():
        best = _best_rate(product, operations, seconds)
        if device == "cpu" and pack_dense_layers(layer, rows):
            best = max(best, _best_rate(product, operations, seconds))
    return best


def int8_matmul_gops(shape: tuple[int, int, int], seconds: float = 1.5) -> float:
    """Best GOP/s of rerankd's int8 dense layer (`--dtype int8`: oneDNN, the input quantized per call) on
    an (M×K)·(K×N) product on the CPU."""
    rows, inner, cols = shape
    layer = Int8Linear(torch.nn.Linear(inner, cols), rows, weight_levels())
    inputs = torch.randn(rows, inner)
    with torch.inference_mode():
        return _best_rate(lambda: layer(inputs), 2 * rows * inner * cols, seconds)


def _best_rate(run: Callable[[], object], operations: int, seconds: float) -> float:
    """Best operations per second (in billions) of `run` over about `seconds`, after one warm-up call."""
    run()
    best = 0.0
    deadline = time.perf_counter() + seconds
    for attempt in itertools.count():
        if attempt >= 2 and time.perf_counter() > deadline:
            break
        started = time.perf_counter()
        run()
        best = max(best, operations / (time.perf_counter() - started) / 1e9)
    return best
