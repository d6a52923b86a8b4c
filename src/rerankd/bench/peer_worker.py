"""Run one peer's scorer (`rerankd.bench.peers`) on the benchmark's workloads in a process of its own.

Invoked by `rerankd bench` as `python -m rerankd.bench.peer_worker SPEC.json`, with the peer's own Python
where it has one, so that its peak RSS is its own. Prints one JSON object: per workload, the latency of each
call; and the scores of the first workload's documents in input order, to compare with rerankd's on the same
model.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

from rerankd.bench.peers import SCORERS
from rerankd.bench.timing import peak_rss_bytes, timed_requests


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    score = SCORERS[spec["scorer"]](spec["model"], spec["dtype"], spec["device"])
    for warm_up in spec["warm_ups"]:  # as the servers are warmed up
        score(warm_up["query"], warm_up["documents"])
    runs = []
    for workload in spec["workloads"]:
        start = time.perf_counter()
        latencies = timed_requests(
            functools.partial(score, workload["query"], workload["documents"]),
            spec["max_requests"],
            spec["max_seconds"],
        )
        runs.append(
            {"workload": workload["name"], "latencies": latencies, "seconds": time.perf_counter() - start}
        )
    first = spec["workloads"][0]
    scores = score(first["query"], first["documents"])
    print(json.dumps({"runs": runs, "scores": scores, "peak_rss": peak_rss_bytes(os.getpid())}))


if __name__ == "__main__":
    main(sys.argv[1])
