"""The throughput targets rerankd is held to, checked against one bench run.

They are set for the base geometry on the passages workload (a query with 64 MS MARCO passages), per device:
on a CPU against sentence-transformers in fp32 and bf16, the matmul ceiling of the dtype rerankd served in
(bf16 or int8 where `--dtype auto` keeps it, else fp32), the ONNX runtimes on every workload, concurrency,
fairness and memory; on a GPU against sentence-transformers fp16 and the bf16 tensor-core ceiling.
BENCHMARKS.md lists each with what the run reached, so a missed target shows by how much.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rerankd.bench.results import GeometryResult

TARGET_GEOMETRY = "base"
SHORT_DTYPES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16", "bfloat16-mixed": "bf16-mixed"}
# The matmul ceiling a precision's dense layers run against, where it is not its own name's.
CEILING_DTYPES = {"bfloat16-mixed": "bfloat16"}


def ceiling_of(ceilings: dict[str, float], dtype: str) -> float | None:
    """The measured matmul ceiling a contender computing in `dtype` runs against, if the run has it."""
    return ceilings.get(CEILING_DTYPES.get(dtype, dtype))


# On a CPU with bf16 units: each pinned precision's pairs/s against rerankd's plain bf16 (issue 36).
AGAINST_BF16 = {"bfloat16-mixed": 0.85, "int8": 1.5}
RERANKD = "rerankd"
ONNX_RUNTIME_PREFIXES = ("onnxruntime", "openvino")
GIGABYTE = 2**30  # as BENCHMARKS.md counts memory (its MB are 2**20 bytes)

Unit = Literal["ratio", "share", "bytes"]


@dataclass(frozen=True)
class Target:
    """A floor (or, with `at_most`, a ceiling) on one number of the run, and the number the run reached."""

    description: str
    goal: float
    reached: float
    unit: Unit = "ratio"
    at_most: bool = False
    # For a pairs/s target: the share of the matmul ceiling (of `ceiling_dtype`) reaching it would take (model
    # FLOPs), which says whether the machine can reach it at all.
    needs_share: float | None = None
    ceiling_dtype: str = "bf16"

    @property
    def met(self) -> bool:
        return self.reached <= self.goal if self.at_most else self.reached >= self.goal

    @property
    def shortfall(self) -> float:
        """How far the run is from the goal, as a fraction of the goal; 0 when met."""
        if self.met:
            return 0.0
        return self.reached / self.goal - 1 if self.at_most else 1 - self.reached / self.goal


def targets_for(result: GeometryResult, ceilings: dict[str, float], device: str) -> list[Target]:
    """The targets of `device` that `result` has the numbers for; none outside the base geometry."""
    if result.geometry != TARGET_GEOMETRY or not result.workloads:
        return []
    passages = str(result.workloads[0]["name"])
    single = result.measurement(RERANKD, passages)
    if single is None:
        return []
    targets: list[Target] = []
    dtype = "bfloat16" if device == "cuda" else CEILING_DTYPES.get(single.dtype, single.dtype)
    ceiling = ceilings.get(dtype)
    short = SHORT_DTYPES.get(dtype, dtype)

    def share(pairs_per_second: float) -> float | None:
        return pairs_per_second * single.mean_flops / 1e9 / ceiling if ceiling else None

    def faster_than(contender: str, goal: float, name: str) -> None:
        peer = result.measurement(contender, passages)
        if peer is not None:
            reached = single.pairs_per_second / peer.pairs_per_second
            needs = share(goal * peer.pairs_per_second)
            description = f"rerankd, 1 client, ≥ {goal:g}× {name}"
            targets.append(Target(description, goal, reached, needs_share=needs, ceiling_dtype=short))

    def of_ceiling(goal: float) -> None:
        reached = share(single.pairs_per_second)
        if reached is not None:
            targets.append(
                Target(
                    f"rerankd, 1 client, ≥ {goal:.0%} of the {short} matmul ceiling", goal, reached, "share"
                )
            )

    if device == "cuda":
        faster_than("sentence-transformers float16", 3.0, "sentence-transformers fp16")
        of_ceiling(0.40)
        return targets
    faster_than("sentence-transformers float32", 6.0, "sentence-transformers fp32")
    faster_than("sentence-transformers bfloat16", 2.5, "sentence-transformers bf16")
    of_ceiling(0.50)
    targets += _leads_onnx_runtimes(result)
    targets += _against_bf16(result, passages)
    many = result.concurrent(RERANKD, passages)
    if many is not None:
        reached = many.pairs_per_second / single.pairs_per_second
        description = f"{many.clients} concurrent clients, ≥ 1.3× one client's pairs/s"
        needs = share(1.3 * single.pairs_per_second)
        targets.append(Target(description, 1.3, reached, needs_share=needs, ceiling_dtype=short))
    if result.fairness is not None:
        targets.append(
            Target(
                "p95 of a small request while a big one runs, ≤ 3× its p95 alone",
                3.0,
                result.fairness.ratio,
                at_most=True,
            )
        )
    if result.bf16_peak_rss:
        targets.append(
            Target(
                "peak RSS serving base in bf16, ≤ 1.2 GB", 1.2 * GIGABYTE, result.bf16_peak_rss, "bytes", True
            )
        )
    return targets


def _against_bf16(result: GeometryResult, workload: str) -> list[Target]:
    """rerankd pinned to bf16-mixed (≥ 0.85x) and to int8 (≥ 1.5x) against rerankd pinned to bf16, 1 client,
    where the run measured them (a CPU with bf16 units)."""
    bf16 = result.measurement(f"{RERANKD} bfloat16", workload)
    if bf16 is None:
        return []
    targets = []
    for dtype, goal in AGAINST_BF16.items():
        pinned = result.measurement(f"{RERANKD} {dtype}", workload)
        if pinned is not None:
            name = SHORT_DTYPES.get(dtype, dtype)
            description = f"rerankd {name}, 1 client, ≥ {goal:g}× rerankd bf16's pairs/s"
            targets.append(Target(description, goal, pinned.pairs_per_second / bf16.pairs_per_second))
    return targets


def _leads_onnx_runtimes(result: GeometryResult) -> list[Target]:
    """rerankd (in the dtype `--dtype auto` chose), 1 client, at least 2x the fastest ONNX Runtime or
    OpenVINO contender on every workload."""
    targets = []
    for workload in (str(entry["name"]) for entry in result.workloads):
        ours = result.measurement(RERANKD, workload)
        runtimes = [
            m
            for m in result.measurements
            if m.workload == workload and m.clients == 1 and m.contender.startswith(ONNX_RUNTIME_PREFIXES)
        ]
        if ours is None or not runtimes:
            continue
        fastest = max(runtimes, key=lambda m: m.pairs_per_second)
        targets.append(
            Target(
                f"rerankd ({SHORT_DTYPES.get(ours.dtype, ours.dtype)}), 1 client, ≥ 2× the fastest ONNX "
                f"runtime ({fastest.contender}) on {workload}",
                2.0,
                ours.pairs_per_second / fastest.pairs_per_second,
            )
        )
    return targets
