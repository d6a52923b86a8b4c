"""Measuring a rerank server that is already up, over HTTP: warm-up, timed load, its scores, fairness."""

from __future__ import annotations

import logging
import threading
import time

import httpx

from rerankd.bench.measure import Measurement, http_load, percentile, rerank_sender
from rerankd.bench.results import Fairness
from rerankd.bench.settings import BenchSettings
from rerankd.bench.timing import timed_requests
from rerankd.bench.workloads import Workload

logger = logging.getLogger(__name__)


def _body(workload: Workload, model: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"query": workload.query, "documents": workload.documents}
    if model is not None:
        body["model"] = model
    return body


def warm_up(url: str, workloads: list[Workload], model: str | None) -> None:
    for workload in workloads:
        httpx.post(url, json=_body(workload, model), timeout=600).raise_for_status()


def served_scores(url: str, workload: Workload) -> list[float]:
    """The server's relevance scores for the workload's documents, in input order."""
    response = httpx.post(url, json=_body(workload), timeout=3600)
    response.raise_for_status()
    scores = [0.0] * len(workload.documents)
    for result in response.json()["results"]:
        scores[result["index"]] = result["relevance_score"]
    return scores


def http_measure(
    settings: BenchSettings,
    contender: str,
    dtype: str,
    url: str,
    workload: Workload,
    clients: int,
    model: str | None,
    flops: float,
) -> Measurement:
    requests = settings.requests_per_client(clients)
    load = http_load(url, _body(workload, model), clients, requests, settings.max_seconds)
    pairs = len(load.latencies) * len(workload.documents)
    logger.info("%s %s, %d client(s): %.2f pairs/s", contender, workload.name, clients, pairs / load.seconds)
    return Measurement(
        contender,
        dtype,
        workload.name,
        clients,
        load.latencies,
        pairs,
        load.seconds,
        mean_flops=flops,
        server_ms=load.server_ms,
    )


def _queued_pairs(client: httpx.Client, base_url: str) -> float:
    """The server's queue, from its Prometheus metrics."""
    lines = client.get(f"{base_url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("rerankd_queued_pairs{"))


def measure_fairness(base_url: str, small: Workload, big: Workload, settings: BenchSettings) -> Fairness:
    """p95 of small requests alone, then while one big request is queued and running."""
    rerank_url = f"{base_url}/rerank"
    with httpx.Client(timeout=3600) as client:
        send_small = rerank_sender(client, rerank_url, _body(small))
        alone = timed_requests(send_small, settings.small_requests, settings.max_seconds)
        big_done = threading.Event()
        big_seconds = [0.0]

        def send_big() -> None:
            with httpx.Client(timeout=3600) as big_client:
                started = time.perf_counter()
                rerank_sender(big_client, rerank_url, _body(big))()
                big_seconds[0] = time.perf_counter() - started
                big_done.set()

        thread = threading.Thread(target=send_big)
        thread.start()
        # The small requests go once the big one's pairs are queued (a GPU may finish it within a second).
        deadline = time.perf_counter() + 60
        while not big_done.is_set() and time.perf_counter() < deadline:
            if _queued_pairs(client, base_url) > 0:
                break
            time.sleep(0.002)
        during: list[float] = []
        while not big_done.is_set() and len(during) < 10 * settings.small_requests:
            during += timed_requests(send_small, 1, settings.max_seconds)
        thread.join()
    if not during:
        raise RuntimeError(f"the {len(big.documents)}-document request was done before a small one could run")
    return Fairness(percentile(alone, 95), percentile(during, 95), len(during), big_seconds[0])
