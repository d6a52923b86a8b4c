"""What one `rerankd bench` run is asked for: the contenders it may measure, and BenchSettings.

A module of its own so that the contenders' drivers and the run that calls them both read it, and the
drivers need not import the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rerankd.bench.results import LLAMACPP_CONTENDER, RERANKD_FLOAT32, RERANKD_PINNED
from rerankd.bench.workloads import Workload, short_warm_up

CROSSENCODER_DTYPES = {"st-fp32": "float32", "st-bf16": "bfloat16", "st-fp16": "float16"}
# ONNX Runtime on the float32 and dynamic int8 exports, OpenVINO on the float32 one at its default precision
# (bf16 on a CPU with bf16 units, f32 elsewhere): DeBERTa's sections.
ONNX_CONTENDERS = ("ort-fp32", "ort-int8", "openvino", "openvino-f32")
# The LLM rerankers' references, named as their scorers in `rerankd.bench.peers`.
LLM_PEERS = ("qwen3-card", "mxbai-rerank")
# rerankd in precisions that need bf16 units to run at speed (emulated elsewhere, at a tenth of fp32's rate).
BF16_CONTENDERS = ("rerankd-bf16", "rerankd-mixed", "st-bf16")
CONTENDERS = (
    "rerankd",
    "rerankd-fp32",
    *RERANKD_PINNED,
    *CROSSENCODER_DTYPES,
    *ONNX_CONTENDERS,
    "infinity",
    "llamacpp",
    *LLM_PEERS,
)
# Each device's peers in the half precision they run fastest in there (bf16 on a CPU with bf16 units, fp16 on
# a GPU); no llama.cpp on a GPU by default (its pip build is CPU-only).
DEFAULT_CONTENDERS = {
    "cpu": (
        "rerankd",
        "rerankd-fp32",
        *RERANKD_PINNED,
        "st-fp32",
        "st-bf16",
        *ONNX_CONTENDERS,
        "infinity",
        "llamacpp",
        *LLM_PEERS,
    ),
    "cuda": ("rerankd", "st-fp32", "st-fp16", "infinity", *LLM_PEERS),
}
# What the LLM rerankers' references compute in: float32 on a CPU (as a user without bf16 units must),
# float16 on a GPU.
LLM_PEER_DTYPES = {"cpu": "float32", "cuda": "float16"}


@dataclass(frozen=True)
class Peer:
    """An in-process contender: its name in the report, its scorer in `rerankd.bench.peers`, its dtype."""

    contender: str
    scorer: str
    dtype: str


# Timed requests per measurement unless asked. A CPU takes seconds over a 64-passage request, so three
# suffice; a GPU answers one in tens of milliseconds, where three would time mostly noise.
DEFAULT_MAX_REQUESTS = {"cpu": 3, "cuda": 100}


@dataclass(frozen=True)
class BenchSettings:
    data: Path
    models: dict[str, Path]  # geometry -> random-weight model folder
    contenders: tuple[str, ...] = CONTENDERS
    infinity: Path | None = None  # the `infinity_emb` executable (its own virtual environment)
    # One section per other family: its random-weight folder at the published geometry, and the same weights
    # as a GGUF where the llama.cpp backend serves them.
    families: dict[str, tuple[Path, Path | None]] = field(default_factory=dict)
    # Peers that run in a Python of their own (mxbai-rerank needs transformers 4.x), by scorer.
    peer_pythons: dict[str, Path] = field(default_factory=dict)
    passages: int = 64
    long_documents: int = 16
    # The other families' workloads are smaller: on 2 cores an LLM reranker takes seconds per pair.
    family_passages: int = 16
    family_long_documents: int = 4
    max_requests: int | None = None  # timed requests per measurement; None: DEFAULT_MAX_REQUESTS[device]
    max_seconds: float = 60.0
    clients: int = 8
    big_request: int = 1000
    small_request: int = 10
    small_requests: int = 10
    log_dir: Path = Path("bench-logs")
    device: str = "cpu"  # where every contender runs: cpu or cuda
    bf16_units: bool = False  # the CPU computes bf16 natively (AMX, AVX512-BF16): OpenVINO's default there

    def rerankd_contenders(self) -> list[str]:
        """rerankd's contenders in the run, by their names in the report."""
        names = {
            "rerankd-fp32": RERANKD_FLOAT32,
            "rerankd": "rerankd",
            "llamacpp": LLAMACPP_CONTENDER,
            **{contender: f"rerankd {dtype}" for contender, dtype in RERANKD_PINNED.items()},
        }
        return [names[contender] for contender in self.contenders if contender in names]

    def crossencoder_peers(self) -> list[Peer]:
        """sentence-transformers in each dtype the run was asked for."""
        return [
            Peer(f"sentence-transformers {dtype}", "sentence-transformers", dtype)
            for name, dtype in CROSSENCODER_DTYPES.items()
            if name in self.contenders
        ]

    def onnx_peers(self) -> list[Peer]:
        """ONNX Runtime and OpenVINO on the section's ONNX export, those the run was asked for."""
        peers = {
            "ort-fp32": Peer("onnxruntime float32", "onnxruntime", "float32"),
            "ort-int8": Peer("onnxruntime int8", "onnxruntime", "int8"),
            "openvino": Peer(
                f"openvino {'bfloat16' if self.bf16_units else 'float32'}",
                "openvino",
                "bfloat16" if self.bf16_units else "float32",
            ),
        }
        if self.bf16_units:  # OpenVINO's default hint is bf16 there: f32 as well, named apart
            peers["openvino-f32"] = Peer("openvino float32", "openvino", "float32")
        return [peer for name, peer in peers.items() if name in self.contenders]

    def llm_peer(self, name: str) -> list[Peer]:
        """The LLM reranker reference `name`, if the run was asked for it."""
        if name not in self.contenders:
            return []
        dtype = LLM_PEER_DTYPES[self.device]
        return [Peer(f"{name} {dtype}", name, dtype)]

    def requests_per_client(self, clients: int) -> int:
        """The measurement's timed requests split among its clients, at least one each."""
        return max(1, (self.max_requests or DEFAULT_MAX_REQUESTS[self.device]) // clients)

    def warm_ups(self, workloads: list[Workload]) -> list[Workload]:
        """What every contender scores untimed before it is timed. A GPU pays the first time it meets a batch
        shape (cuBLAS picks kernels, a CUDA graph is captured), so there each workload whole; on a CPU a
        short call does."""
        return workloads if self.device == "cuda" else [short_warm_up(workloads[0])]
