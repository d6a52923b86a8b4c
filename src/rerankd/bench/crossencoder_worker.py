"""Run sentence-transformers' `CrossEncoder.rank` on the benchmark's workloads in a process of its own.

Invoked by `rerankd bench` as `python -m rerankd.bench.crossencoder_worker SPEC.json`, so that its peak RSS
is its own. Prints one JSON object: per workload, the latency of each `rank` call; and the scores of the
first workload's documents in input order, to compare with rerankd's on the same model.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
from sentence_transformers import CrossEncoder

from rerankd.bench.measure import timed_requests
from rerankd.bench.processes import peak_rss_bytes


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    dtype = getattr(torch, spec["dtype"])
    model = CrossEncoder(spec["model"], device=spec["device"], model_kwargs={"dtype": dtype})
    first = spec["workloads"][0]
    for warm_up in spec["warm_ups"]:  # as the servers are warmed up
        model.rank(warm_up["query"], warm_up["documents"])
    runs = []
    for workload in spec["workloads"]:
        start = time.perf_counter()
        latencies = timed_requests(
            functools.partial(model.rank, workload["query"], workload["documents"]),
            spec["max_requests"],
            spec["max_seconds"],
        )
        runs.append(
            {"workload": workload["name"], "latencies": latencies, "seconds": time.perf_counter() - start}
        )
    ranked = model.rank(first["query"], first["documents"])
    scores = [0.0] * len(first["documents"])
    for entry in ranked:
        scores[entry["corpus_id"]] = float(entry["score"])
    print(json.dumps({"runs": runs, "scores": scores, "peak_rss": peak_rss_bytes(os.getpid())}))


if __name__ == "__main__":
    main(sys.argv[1])
