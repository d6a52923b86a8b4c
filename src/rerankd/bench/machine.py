"""What the benchmark ran on: CPU model and features, cores, library versions, and matmul throughput."""

from __future__ import annotations

import itertools
import os
import platform
import time
from pathlib import Path

import torch

INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


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
    """Best GFLOP/s of an (M×K)·(K×N) product, `shape` = (M, K, N), with the weight stored as `nn.Linear`
    stores it: shaped like the model's dense layers, the ceiling those layers run against on this machine."""
    rows, inner, cols = shape
    a = torch.randn(rows, inner, device=device).to(dtype)
    weight = torch.randn(cols, inner, device=device).to(dtype)  # stored as nn.Linear stores it
    torch.nn.functional.linear(a, weight)
    best = 0.0
    deadline = time.perf_counter() + seconds
    for attempt in itertools.count():
        if attempt >= 2 and time.perf_counter() > deadline:
            break
        started = time.perf_counter()
        torch.nn.functional.linear(a, weight)
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * rows * inner * cols / (time.perf_counter() - started) / 1e9)
    return best
