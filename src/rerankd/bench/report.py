"""BENCHMARKS.md and JSON from a `rerankd bench` run: throughput as ratios within the one run."""

from __future__ import annotations

import json
from dataclasses import asdict

from rerankd.bench.measure import Measurement
from rerankd.bench.results import LLAMACPP_CONTENDER, BenchResult, GeometryResult, PassProfile
from rerankd.bench.targets import RERANKD, Target, ceiling_of, targets_for


def _megabytes(value: int | None) -> str:
    return f"{value / 2**20:,.0f} MB" if value else "–"


def _row(measurement: Measurement, baseline: float | None, ceilings: dict[str, float]) -> str:
    ratio = f"{measurement.pairs_per_second / baseline:.2f}×" if baseline else "–"
    ceiling = ceiling_of(ceilings, measurement.dtype)
    used = measurement.pairs_per_second * measurement.mean_flops / 1e9
    fraction = f"{100 * used / ceiling:.0f}%" if ceiling else "–"
    return (
        f"| {measurement.contender} | {measurement.dtype} | {measurement.clients} | "
        f"{measurement.pairs_per_second:.2f} | {ratio} | {measurement.p50:.2f} | {measurement.p95:.2f} | "
        f"{_megabytes(measurement.peak_rss)} | {used:.0f} | {fraction} |"
    )


def _server_time_line(measurement: Measurement) -> str:
    parts = ", ".join(f"{part} {ms:.1f} ms" for part, ms in measurement.server_ms.items())
    return (
        f"- {measurement.contender}, {measurement.clients} client{'s' if measurement.clients > 1 else ''}, "
        "by the server's own timing headers "
        f"(median per request): {parts}."
    )


def _profile_section(profiles: list[PassProfile]) -> list[str]:
    """Each profiled pass's time by kind of work, one column per workload."""
    dtypes = sorted({profiled.dtype for profiled in profiles})
    columns = [
        f"{profiled.workload}: {profiled.pairs} × {profiled.length} tokens, {profiled.seconds:.2f} s"
        for profiled in profiles
    ]
    kinds = list(dict.fromkeys(kind for profiled in profiles for kind in profiled.shares))
    lines = [
        f"### Where a pass's time goes: rerankd in {', '.join(dtypes)}",
        "",
        "One pass per workload (the one holding its median pair, cut as the scheduler cuts a request, on a "
        "worker thread as the server runs it; its time unprofiled in the header) under torch's profiler: "
        "each op's own time, grouped by the kind of work it does, as a share of the pass's.",
        "",
        f"| kind of work | {' | '.join(columns)} |",
        f"|---|{'---|' * len(columns)}",
    ]
    for kind in kinds:
        shares = " | ".join(f"{100 * profiled.shares.get(kind, 0.0):.0f}%" for profiled in profiles)
        lines.append(f"| {kind} | {shares} |")
    return [*lines, ""]


def _geometry_section(result: GeometryResult, ceilings: dict[str, float]) -> list[str]:
    config = result.config
    lines = [f"## {result.geometry} ({config['layers']} layers, hidden {config['hidden']})", ""]
    if result.baseline:
        lines += [f"Pairs/s are compared with {result.baseline} (×).", ""]
    for workload in result.workloads:
        name = str(workload["name"])
        baseline = result.measurement(result.baseline, name) if result.baseline else None
        lines += [
            f"### {name}: {float(workload['mean_tokens']):.0f} tokens per pair on average, "
            f"{float(workload['gflops_per_pair']):.1f} GFLOP per pair",
            "",
            "| contender | dtype | clients | pairs/s | × | p50 s | p95 s | peak RSS | GFLOP/s | "
            "of matmul ceiling |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            _row(m, baseline.pairs_per_second if baseline else None, ceilings)
            for m in result.measurements
            if m.workload == name
        ]
        lines.append("")
        server_lines = [
            _server_time_line(m) for m in result.measurements if m.workload == name and m.server_ms
        ]
        if server_lines:
            lines += [*server_lines, ""]
    many = next((m for m in result.measurements if m.contender.startswith(RERANKD) and m.clients > 1), None)
    single = result.measurement(many.contender, many.workload) if many else None
    if single and many:
        lines.append(
            f"- Concurrency: {many.clients} clients reach {many.pairs_per_second:.2f} pairs/s in total, "
            f"{many.pairs_per_second / single.pairs_per_second:.2f}× one client's."
        )
    if result.fairness:
        fair = result.fairness
        lines.append(
            f"- Fairness: p95 of a small request alone {fair.alone_p95:.2f} s; while a big request runs "
            f"({fair.big_seconds:.0f} s) {fair.during_p95:.2f} s over {fair.during_count} requests: "
            f"{fair.ratio:.2f}× alone."
        )
    served = result.measurement(result.served, str(result.workloads[0]["name"])) if result.served else None
    for peer, drift in result.score_drift.items():
        lines.append(
            f"- Same model, same scores: {peer} is within {drift:.1e} of {result.served}'s"
            f"{f' ({served.dtype})' if served else ''} scores on the {result.workloads[0]['name']} "
            "(max |Δscore|)."
        )
    if result.bf16_peak_rss:
        lines.append(
            f"- Peak RSS of rerankd serving this model in bfloat16 (load, then an 8-document request): "
            f"{_megabytes(result.bf16_peak_rss)}."
        )
    lines.append("")
    if result.profiles:
        lines += _profile_section(result.profiles)
    return lines


def shown(target: Target) -> str:
    """What `target` reached, in its unit."""
    if target.unit == "share":
        return f"{100 * target.reached:.0f}%"
    if target.unit == "bytes":
        return _megabytes(int(target.reached))
    return f"{target.reached:.2f}×"


def _targets_section(targets: list[Target]) -> list[str]:
    lines = [
        f"### Targets: {sum(target.met for target in targets)} of {len(targets)} met in this run",
        "",
        "| target | reached | |",
        "|---|---|---|",
    ]
    for target in targets:
        verdict = "met" if target.met else f"missed by {100 * target.shortfall:.0f}%"
        if not target.met and target.needs_share is not None:
            verdict += (
                f" (reaching it would take {100 * target.needs_share:.0f}% of the {target.ceiling_dtype} "
                "matmul ceiling)"
            )
        lines.append(f"| {target.description} | {shown(target)} | {verdict} |")
    return [*lines, ""]


def render_markdown(result: BenchResult) -> str:
    machine = result.machine
    rows, inner, cols = result.ceiling_shape
    lines = [
        "# Benchmarks",
        "",
        f"Written by `{result.command}` on {result.date}. All numbers below come from this one run; "
        "these machines are noisy, so compare within a run, not across runs.",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, "
        f"features {machine['cpu_features'] or 'none'}, {machine['memory_gb']} GB; "
        f"GPU: {machine['gpu'] or 'none'}; torch {machine['torch']}.",
        f"- Matmul ceiling ({rows}×{inner} · {inner}×{cols}, a dense layer's shape at the device's default "
        "token budget; best of ~1.5 s at the start and at the end of the run): "
        + ", ".join(
            f"{dtype} {gflops:.1f} {'GOP/s' if dtype == 'int8' else 'GFLOP/s'}"
            for dtype, gflops in result.ceilings.items()
        )
        + " (int8: rerankd's `--dtype int8` dense layer, its input's quantization included)"
        + '. "Of matmul ceiling" = pairs/s × model FLOPs per pair ÷ the ceiling of the contender\'s dtype.',
        "- Models: random weights at the real mxbai-rerank geometries with the real DeBERTa-v3 tokenizer "
        "(speed does not depend on the weights' values). Workloads: the first judged MS MARCO DL19 query "
        "with its passages, and long documents of consecutive passages near the 512-token limit.",
        "- rerankd and Infinity are measured over HTTP on loopback (latency = one request); the in-process "
        "peers (sentence-transformers `CrossEncoder.rank`; ONNX Runtime and OpenVINO on the model's ONNX "
        "export by `rerankd export --format onnx`, fed the `transformers` tokenizer's pairs 32 at a time; "
        "Qwen3-Reranker's model card code, the `mxbai-rerank` package's `rank`) each in a process of its "
        "own (latency = one call). Peak RSS is "
        "each process's VmHWM. Model FLOPs: DeBERTa's counted analytically, the other families' by torch's "
        "FLOP counter on their `transformers` network (an LLM reranker's decoder, without the vocabulary "
        "head).",
        "",
    ]
    families = [g for g in result.geometries if g.family != "deberta-v2"]
    if families:
        lines[-1:-1] = [
            "- Other families: one section each, at the published model's geometry with random weights and a "
            "tokenizer of the family's kind trained offline (BERT's and XLM-R's on the corpus; the others' "
            "on Python's documentation, so their pairs are longer than the real tokenizers' make them: the "
            "tables say how long), on smaller workloads, from one client."
        ]
    if any(m.contender == LLAMACPP_CONTENDER for g in families for m in g.measurements):
        lines[-1:-1] = [
            f"- {LLAMACPP_CONTENDER}: the same weights as an F32 GGUF on rerankd's llama.cpp backend: BERT's "
            "(its uncased WordPiece tokenizer trained on the corpus) in llama.cpp's layout with the pooler, "
            "XLM-R's (its SentencePiece model trained on the corpus) and ModernBERT's as llama.cpp's own "
            "converter writes them; the peers run the transformers folder."
        ]
    for geometry in result.geometries:
        lines += _geometry_section(geometry, result.ceilings)
        targets = targets_for(geometry, result.ceilings, result.device)
        if targets:
            lines += _targets_section(targets)
    return "\n".join(lines)


def render_json(result: BenchResult) -> str:
    return json.dumps(asdict(result), indent=2, default=str)
