"""`rerankd bench`'s run: rerankd and its peers on the same model and workloads, in one run, on one machine.

One section per DeBERTa geometry (rerankd over HTTP from 1 and N clients, sentence-transformers in fp32 and a
half precision, Infinity), and one per other family at its published model's geometry: rerankd (and its
llama.cpp backend on the same weights as a GGUF, where it serves them) against the family's reference,
sentence-transformers for the encoders, the model card's code for Qwen3-Reranker and the mxbai-rerank
package for mxbai-rerank-v2; the matmul ceilings they are measured against, at the start and at the end;
and the scores of rerankd and each peer on the same model compared. How each contender is driven is in
`rerankd.bench.contenders`.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import torch

from rerankd.bench.contenders import (
    BenchModel,
    bench_infinity,
    bench_peer,
    bench_rerankd,
    rerankd_bf16_peak_rss,
)
from rerankd.bench.machine import describe_machine, int8_matmul_gops, matmul_gflops
from rerankd.bench.profile import profile_passes
from rerankd.bench.results import BenchResult, GeometryResult
from rerankd.bench.settings import BenchSettings, Peer
from rerankd.bench.workloads import make_workloads, passages_workload, served_pair_tokenizer
from rerankd.catalog import CAUSAL_FAMILY_MODELS, ENCODER_FAMILY_MODELS
from rerankd.modeling.quantized import int8_available
from rerankd.quality.beir import BeirDataset, load_beir
from rerankd.settings import DEFAULT_BATCH_TOKENS

logger = logging.getLogger(__name__)

CEILING_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}


def _max_difference(left: list[float], right: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(left, right, strict=True))


# Each LLM reranker's reference, by family; the encoders' is sentence-transformers.
LLM_REFERENCES = {"qwen3-reranker": "qwen3-card", "mxbai-rerank-v2": "mxbai-rerank"}


def bench_model(
    settings: BenchSettings, dataset: BeirDataset, model: BenchModel, peers: list[Peer], deberta: bool
) -> GeometryResult:
    """One section: each rerankd contender the run asked for that serves `model`, then `peers`. A DeBERTa
    section takes the full workloads and also measures concurrency, fairness, the bf16 footprint and
    Infinity, and profiles a pass of each workload on a CPU; the other families' take the smaller ones, from
    one client."""
    counts = (
        (settings.passages, settings.long_documents)
        if deberta
        else (settings.family_passages, settings.family_long_documents)
    )
    tokenizer = served_pair_tokenizer(model.folder, settings.device)
    workloads = make_workloads(dataset, tokenizer, *counts)
    result = GeometryResult(
        model.family,
        model.title,
        model.shape,
        [
            {"name": w.name, "mean_tokens": w.mean_tokens, "gflops_per_pair": model.mean_flops(w) / 1e9}
            for w in workloads
        ],
        baseline=peers[0].contender if peers else None,
    )
    served_scores = None
    big = passages_workload(dataset, tokenizer, settings.big_request) if deberta else None
    for contender in model.servings:
        if contender not in settings.rerankd_contenders():
            continue
        # Concurrency and fairness are measured on what users run: rerankd as `--dtype auto` serves.
        served_as_is = deberta and contender == "rerankd"
        run = bench_rerankd(
            settings, model, contender, workloads, big if served_as_is else None, concurrent=served_as_is
        )
        result.measurements += run.measurements
        result.fairness = result.fairness or run.fairness
        if served_scores is None:
            result.served, served_scores = contender, run.scores
        else:  # auto's dtype, or the llama.cpp backend on the same weights: how close to the first
            result.score_drift[contender] = _max_difference(served_scores, run.scores)
        if served_as_is:
            result.bf16_peak_rss = rerankd_bf16_peak_rss(settings, model, workloads[0])
            if settings.device == "cpu":
                result.profiles = profile_passes(model.folder, run.measurements[0].dtype, workloads)
    for peer in peers:
        measured, scores = bench_peer(settings, model, workloads, peer)
        result.measurements += measured
        if served_scores is not None:
            result.score_drift[peer.contender] = _max_difference(served_scores, scores)
    if deberta and "infinity" in settings.contenders and settings.infinity is not None:
        result.measurements += bench_infinity(settings, model, workloads)
    return result


def bench_family(
    settings: BenchSettings, dataset: BeirDataset, family: str, folder: Path, gguf_path: Path | None
) -> GeometryResult:
    hub_id = {**ENCODER_FAMILY_MODELS, **CAUSAL_FAMILY_MODELS}[family]
    model = BenchModel.transformers(family, f"{family}: {hub_id} geometry", folder, gguf_path)
    reference = LLM_REFERENCES.get(family)
    peers = settings.crossencoder_peers() if reference is None else settings.llm_peer(reference)
    return bench_model(settings, dataset, model, peers, deberta=False)


def ceiling_shape(device: str) -> tuple[int, int, int]:
    """base's 768→3072 feed-forward over the scheduler's default token budget on `device`: the product the
    dense layers run against."""
    return (DEFAULT_BATCH_TOKENS[device], 768, 3072)


def measure_ceilings(device: str) -> dict[str, float]:
    shape = ceiling_shape(device)
    ceilings = {
        str(dtype).removeprefix("torch."): matmul_gflops(dtype, shape, device=device)
        for dtype in CEILING_DTYPES[device]
    }
    if device == "cpu" and int8_available():
        ceilings["int8"] = int8_matmul_gops(shape)
    logger.info("matmul ceilings (GFLOP/s): %s", {k: round(v) for k, v in ceilings.items()})
    return ceilings


def run_bench(settings: BenchSettings, command: str) -> BenchResult:
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    ceilings = measure_ceilings(settings.device)
    dataset = load_beir(settings.data)  # every section's workloads come from it
    results = [
        bench_model(
            settings,
            dataset,
            BenchModel.deberta(geometry, folder),
            settings.crossencoder_peers() + settings.onnx_peers(),
            deberta=True,
        )
        for geometry, folder in settings.models.items()
    ]
    results += [
        bench_family(settings, dataset, family, folder, gguf_path)
        for family, (folder, gguf_path) in settings.families.items()
    ]
    # A busy neighbour can depress one measurement; the ceiling is the best the machine showed in the run.
    ceilings = {
        dtype: max(gflops, ceilings[dtype]) for dtype, gflops in measure_ceilings(settings.device).items()
    }
    return BenchResult(
        datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command,
        describe_machine(),
        ceilings,
        ceiling_shape(settings.device),
        results,
        settings.device,
    )
