"""What a `rerankd bench` run found, in the types the report, the targets and the JSON are made from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from rerankd.bench.measure import Measurement

# The contender name of rerankd serving a GGUF through its llama.cpp backend, which the report describes.
LLAMACPP_CONTENDER = "rerankd (llama.cpp)"
# rerankd pinned to float32, beside `--dtype auto`'s choice: the reference the other scores are compared with.
RERANKD_FLOAT32 = "rerankd float32"
# DeBERTa pinned to each faster precision a CPU may serve, by contender: what `auto` chooses between.
RERANKD_PINNED = {"rerankd-bf16": "bfloat16", "rerankd-mixed": "bfloat16-mixed", "rerankd-int8": "int8"}


@dataclass
class Fairness:
    """Latency of small requests alone and while one big request is being scored."""

    alone_p95: float
    during_p95: float
    during_count: int
    big_seconds: float

    @property
    def ratio(self) -> float:
        return self.during_p95 / self.alone_p95


@dataclass
class PassProfile:
    """One forward pass of a workload under torch's profiler (`rerankd.bench.profile`)."""

    workload: str
    dtype: str
    pairs: int
    length: int  # the pass's padded length in tokens
    seconds: float  # the pass unprofiled, the best of a few
    shares: dict[str, float]  # kind of work -> its share of the profiled pass's op time


@dataclass
class GeometryResult:
    family: str  # deberta-v2, or the other family the section measures
    geometry: str
    config: dict[str, int]
    workloads: list[dict[str, float | str]]
    measurements: list[Measurement] = field(default_factory=list)
    fairness: Fairness | None = None
    bf16_peak_rss: int | None = None  # rerankd serving the model in bfloat16: load plus one small request
    # Max |Δscore| of each peer and each other rerankd contender (by contender name) against `served`, on the
    # first workload's documents.
    score_drift: dict[str, float] = field(default_factory=dict)
    served: str | None = None  # the rerankd contender whose scores the peers are compared with
    baseline: str | None = None  # the peer every contender's pairs/s is a ratio of
    profiles: list[PassProfile] = field(default_factory=list)  # rerankd's passes, in the dtype it served

    def measurement(self, contender: str, workload: str, clients: int = 1) -> Measurement | None:
        """The run of `contender` on `workload` with `clients` clients, if it was measured."""
        for measurement in self.measurements:
            if (measurement.contender, measurement.workload, measurement.clients) == (
                contender,
                workload,
                clients,
            ):
                return measurement
        return None

    def concurrent(self, contender: str, workload: str) -> Measurement | None:
        """The run of `contender` on `workload` with several clients at once, if it was measured."""
        return next(
            (
                m
                for m in self.measurements
                if (m.contender, m.workload) == (contender, workload) and m.clients > 1
            ),
            None,
        )


@dataclass
class BenchResult:
    date: str
    command: str
    machine: dict[str, object]
    ceilings: dict[str, float]  # dtype -> matmul GFLOP/s
    ceiling_shape: tuple[int, int, int]  # the product measured: (rows, inner, columns)
    geometries: list[GeometryResult]
    device: str = "cpu"  # where every contender ran: cpu | cuda


def result_from_json(text: str) -> BenchResult:
    """A run's raw results as `rerankd bench --json` wrote them, to render its report again."""
    raw = json.loads(text)
    sections = []
    for section in raw.pop("geometries"):
        fairness = section.pop("fairness")
        measurements = [Measurement(**measurement) for measurement in section.pop("measurements")]
        profiles = [PassProfile(**profiled) for profiled in section.pop("profiles", [])]
        sections.append(
            GeometryResult(
                **section,
                measurements=measurements,
                fairness=Fairness(**fairness) if fairness else None,
                profiles=profiles,
            )
        )
    raw["ceiling_shape"] = tuple(raw["ceiling_shape"])
    return BenchResult(**raw, geometries=sections)
