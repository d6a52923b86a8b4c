"""Timing and memory records that need nothing beyond the standard library: the peer workers import them from
other virtual environments (mxbai-rerank's), where neither httpx nor numpy may be installed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def timed_requests(
    send: Callable[[], object], max_requests: int, max_seconds: float, start: float | None = None
) -> list[float]:
    """Call `send` until `max_requests` are done or `max_seconds` have passed since `start` (at least one)."""
    start = time.perf_counter() if start is None else start
    latencies: list[float] = []
    while len(latencies) < max_requests and (not latencies or time.perf_counter() - start < max_seconds):
        began = time.perf_counter()
        send()
        latencies.append(time.perf_counter() - began)
    return latencies


def peak_rss_bytes(pid: int) -> int | None:
    """The process's high-water resident set (VmHWM): unlike ru_maxrss, its own and not its parent's."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
