"""Timing records and the closed-loop HTTP load generator the benchmark drives servers with."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from rerankd.bench.timing import timed_requests


@dataclass
class Measurement:
    contender: str
    dtype: str
    workload: str
    clients: int
    latencies: list[float]  # seconds per request
    pairs: int  # pairs scored within `seconds`
    seconds: float
    peak_rss: int | None = None
    mean_flops: float = 0.0  # per pair of this workload
    # Median ms per request of each part the server itself reported timing (SERVER_TIME_HEADERS); empty for
    # servers that report none.
    server_ms: dict[str, float] = field(default_factory=dict)

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p95(self) -> float:
        return percentile(self.latencies, 95)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy's import cost in workers."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# Where a request's time went inside rerankd, in ms, by its response headers (TEI's names).
SERVER_TIME_HEADERS = {
    "tokenization": "x-tokenization-time",
    "queue": "x-queue-time",
    "inference": "x-inference-time",
    "total": "x-total-time",
}


def rerank_sender(
    client: httpx.Client,
    url: str,
    body: dict[str, object],
    server_times: list[dict[str, float]] | None = None,
) -> Callable[[], None]:
    """A closure posting `body` and checking that every document came back scored; each response's timing
    headers, where the server sends them, go to `server_times`."""
    expected = len(body["documents"])  # type: ignore[arg-type]

    def send() -> None:
        response = client.post(url, json=body)
        response.raise_for_status()
        results = response.json()["results"]
        if len(results) != expected:
            raise RuntimeError(f"{url} returned {len(results)} results for {expected} documents")
        if server_times is not None:
            headers = response.headers
            times = {
                part: float(headers[name]) for part, name in SERVER_TIME_HEADERS.items() if name in headers
            }
            if times:
                server_times.append(times)

    return send


@dataclass(frozen=True)
class HttpLoad:
    latencies: list[float]  # seconds per request
    seconds: float  # wall time of the whole load
    server_ms: dict[str, float]  # median of each part the server reported (Measurement.server_ms)


def http_load(
    url: str, body: dict[str, object], clients: int, max_requests: int, max_seconds: float
) -> HttpLoad:
    """`clients` threads, each posting `body` back to back."""
    results: list[list[float]] = [[] for _ in range(clients)]
    server_times: list[dict[str, float]] = []  # list.append is atomic: the clients share it
    errors: list[BaseException] = []
    start = time.perf_counter()

    def client_loop(slot: int) -> None:
        try:
            with httpx.Client(timeout=3600) as client:
                results[slot] = timed_requests(
                    rerank_sender(client, url, body, server_times), max_requests, max_seconds, start
                )
        except BaseException as error:  # surfaced in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=client_loop, args=(slot,)) for slot in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    seconds = time.perf_counter() - start
    latencies = [latency for client in results for latency in client]
    medians = {}
    for part in SERVER_TIME_HEADERS:
        reported = [times[part] for times in server_times if part in times]
        if reported:
            medians[part] = statistics.median(reported)
    return HttpLoad(latencies, seconds, medians)


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0
