"""What one `rerankd bench` run is asked for: the contenders it may measure, and BenchSettings.

A module of its own so that the contenders' drivers and the run that calls them both read it, and the
drivers need not import the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rerankd.bench.workloads import Workload, short_warm_up

CROSSENCODER_DTYPES = {"st-fp32": "float32", "st-bf16": "bfloat16", "st-fp16": "float16"}
DEBERTA_CONTENDERS = ("rerankd", *CROSSENCODER_DTYPES, "infinity")
CONTENDERS = (*DEBERTA_CONTENDERS, "llamacpp")
# Each device's peers in the half precision they run fastest in there (bf16 on a CPU with bf16 units, fp16 on
# a GPU); no llama.cpp on a GPU by default (its pip build is CPU-only).
DEFAULT_CONTENDERS = {
    "cpu": ("rerankd", "st-fp32", "st-bf16", "infinity", "llamacpp"),
    "cuda": ("rerankd", "st-fp32", "st-fp16", "infinity"),
}

# Timed requests per measurement unless asked. A CPU takes seconds over a 64-passage request, so three
# suffice; a GPU answers one in tens of milliseconds, where three would time mostly noise.
DEFAULT_MAX_REQUESTS = {"cpu": 3, "cuda": 100}


@dataclass(frozen=True)
class BenchSettings:
    data: Path
    models: dict[str, Path]  # geometry -> random-weight model folder
    contenders: tuple[str, ...] = CONTENDERS
    infinity: Path | None = None  # the `infinity_emb` executable (its own virtual environment)
    llamacpp: tuple[Path, Path] | None = None  # a BERT reranker: (transformers folder, the same as GGUF)
    passages: int = 64
    long_documents: int = 16
    max_requests: int | None = None  # timed requests per measurement; None: DEFAULT_MAX_REQUESTS[device]
    max_seconds: float = 60.0
    clients: int = 8
    big_request: int = 1000
    small_request: int = 10
    small_requests: int = 10
    log_dir: Path = Path("bench-logs")
    device: str = "cpu"  # where every contender runs: cpu or cuda

    def requests_per_client(self, clients: int) -> int:
        """The measurement's timed requests split among its clients, at least one each."""
        return max(1, (self.max_requests or DEFAULT_MAX_REQUESTS[self.device]) // clients)

    def warm_ups(self, workloads: list[Workload]) -> list[Workload]:
        """What every contender scores untimed before it is timed. A GPU pays the first time it meets a batch
        shape (cuBLAS picks kernels, a CUDA graph is captured), so there each workload whole; on a CPU a
        short call does."""
        return workloads if self.device == "cuda" else [short_warm_up(workloads[0])]
