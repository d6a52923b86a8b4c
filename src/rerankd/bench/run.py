"""`rerankd bench`'s run: rerankd and its peers on the same model and workloads, in one run, on one machine.

One section per DeBERTa geometry (rerankd over HTTP from 1 and N clients, sentence-transformers in fp32 and a
half precision, Infinity) and one for a BERT GGUF on rerankd's llama.cpp backend against sentence-transformers
on the same weights; the matmul ceilings they are measured against, at the start and at the end; and the
scores of rerankd and sentence-transformers on the same model compared. How each contender is driven is in
`rerankd.bench.contenders`.
"""

from __future__ import annotations

import datetime
import logging

import torch

from rerankd.bench.contenders import (
    BenchModel,
    bench_crossencoder,
    bench_infinity,
    bench_rerankd,
    rerankd_bf16_peak_rss,
)
from rerankd.bench.machine import describe_machine, matmul_gflops
from rerankd.bench.results import LLAMACPP_CONTENDER, BenchResult, GeometryResult
from rerankd.bench.settings import CROSSENCODER_DTYPES, DEBERTA_CONTENDERS, BenchSettings
from rerankd.bench.workloads import make_workloads, passages_workload
from rerankd.engine.tokenize import PairTokenizer
from rerankd.formats.tokenizer import load_tokenizer
from rerankd.quality.beir import load_beir
from rerankd.settings import DEFAULT_BATCH_TOKENS

logger = logging.getLogger(__name__)

CEILING_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}


def _max_difference(left: list[float], right: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(left, right, strict=True))


def bench_model(
    settings: BenchSettings,
    model: BenchModel,
    contender: str | None,
    crossencoders: dict[str, str],
    peers: bool,
) -> GeometryResult:
    """One section: rerankd as `contender` (None: not measured), sentence-transformers in `crossencoders`'
    dtypes and, with `peers`, the fairness run, the bf16 footprint and Infinity."""
    workloads = make_workloads(settings.data, model.folder, settings.passages, settings.long_documents)
    result = GeometryResult(
        model.title,
        model.shape,
        [
            {"name": w.name, "mean_tokens": w.mean_tokens, "gflops_per_pair": model.mean_flops(w) / 1e9}
            for w in workloads
        ],
    )
    served_scores = None
    if contender is not None:
        big = None
        if peers:
            tokenizer = PairTokenizer(load_tokenizer(model.folder), 512)
            big = passages_workload(load_beir(settings.data), tokenizer, settings.big_request)
        run = bench_rerankd(settings, model, contender, workloads, big)
        result.measurements += run.measurements
        result.fairness, served_scores = run.fairness, run.scores
        if peers:
            result.bf16_peak_rss = rerankd_bf16_peak_rss(settings, model, workloads[0])
    for dtype in crossencoders.values():
        measured, scores = bench_crossencoder(settings, model, workloads, dtype)
        result.measurements += measured
        if served_scores is not None:
            result.score_drift[dtype] = _max_difference(served_scores, scores)
    if peers and "infinity" in settings.contenders and settings.infinity is not None:
        result.measurements += bench_infinity(settings, model, workloads)
    return result


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
    logger.info("matmul ceilings (GFLOP/s): %s", {k: round(v) for k, v in ceilings.items()})
    return ceilings


def run_bench(settings: BenchSettings, command: str) -> BenchResult:
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    ceilings = measure_ceilings(settings.device)
    crossencoders = {
        name: dtype for name, dtype in CROSSENCODER_DTYPES.items() if name in settings.contenders
    }
    results = [
        bench_model(
            settings,
            BenchModel.deberta(geometry, folder),
            "rerankd" if "rerankd" in settings.contenders else None,
            crossencoders,
            peers=True,
        )
        for geometry, folder in settings.models.items()
        if set(settings.contenders) & set(DEBERTA_CONTENDERS)
    ]
    if "llamacpp" in settings.contenders and settings.llamacpp is not None:
        folder, gguf_path = settings.llamacpp
        model = BenchModel.llamacpp("BERT MiniLM-L6 geometry, F32 GGUF on llama.cpp", folder, gguf_path)
        results.append(bench_model(settings, model, LLAMACPP_CONTENDER, {"st-fp32": "float32"}, peers=False))
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
