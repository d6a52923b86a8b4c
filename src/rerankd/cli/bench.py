"""`rerankd bench`: rerankd against its peers, random-weight models at the real geometries; BENCHMARKS.md."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from rerankd.catalog import CATALOG
from rerankd.cli.flags import positive


def add_parser(commands: Any) -> None:
    bench = commands.add_parser(
        "bench", help="benchmark rerankd against sentence-transformers and Infinity; write BENCHMARKS.md"
    )
    bench.add_argument(
        "--geometry",
        action="append",
        choices=sorted(CATALOG),
        default=None,
        help="(default: base and xsmall)",
    )
    bench.add_argument(
        "--data", type=Path, default=Path("../shared/data/msmarco-dl19-subset"), help="a BEIR folder"
    )
    bench.add_argument(
        "--tokenizer",
        type=Path,
        default=Path("../shared/fixtures/deberta-v3-tokenizer"),
        help="the real tokenizer files for the random-weight models",
    )
    bench.add_argument(
        "--models-dir", type=Path, default=Path("models/bench"), help="random models are kept here"
    )
    bench.add_argument(
        "--contenders",
        nargs="+",
        default=None,
        help="subset of: rerankd st-fp32 st-bf16 st-fp16 infinity llamacpp (a BERT GGUF on the llama.cpp "
        "backend); default: all but st-fp16 on a CPU, all but st-bf16 and llamacpp on CUDA",
    )
    bench.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where every contender runs (default: cpu)"
    )
    bench.add_argument(
        "--infinity", type=Path, default=None, help="the infinity_emb executable (its own venv)"
    )
    bench.add_argument("--passages", type=positive, default=64, help="documents in the passages workload")
    bench.add_argument("--long-documents", type=positive, default=16, help="documents in the long workload")
    bench.add_argument(
        "--max-requests",
        type=positive,
        default=None,
        help="timed requests per measurement, split among its clients (default: 3 on a CPU, 100 on CUDA)",
    )
    bench.add_argument(
        "--max-seconds", type=float, default=60.0, help="stop a measurement after this (≥1 request)"
    )
    bench.add_argument("--clients", type=positive, default=8, help="concurrent clients")
    bench.add_argument(
        "--big-request", type=positive, default=1000, help="documents in the fairness test's big request"
    )
    bench.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    bench.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from rerankd.bench.report import render_json, render_markdown
    from rerankd.bench.run import run_bench
    from rerankd.bench.settings import CONTENDERS, DEFAULT_CONTENDERS, BenchSettings
    from rerankd.devtools.random_model import write_random_model

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress
    if args.device == "cuda" and not torch.cuda.is_available():
        print("rerankd bench: --device cuda: CUDA is not available on this machine", file=sys.stderr)
        return 2
    contenders = tuple(args.contenders or DEFAULT_CONTENDERS[args.device])
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        print(
            f"rerankd bench: unknown contenders {sorted(unknown)}; choose from {CONTENDERS}", file=sys.stderr
        )
        return 2
    for path, what in ((args.data / "corpus.jsonl", "--data"), (args.tokenizer, "--tokenizer")):
        if not path.exists():
            print(f"rerankd bench: {what}: {path} does not exist", file=sys.stderr)
            return 2
    if "llamacpp" in contenders and importlib.util.find_spec("llama_cpp") is None:
        print("rerankd bench: skipping llamacpp: pip install 'rerankd[llamacpp]'", file=sys.stderr)
        contenders = tuple(contender for contender in contenders if contender != "llamacpp")
    models = {}
    for geometry in args.geometry or ["base", "xsmall"]:
        folder = args.models_dir / f"random-{geometry}"
        if not (folder / "config.json").is_file():
            write_random_model(folder, geometry=geometry, tokenizer_dir=args.tokenizer)
        models[geometry] = folder
    settings = BenchSettings(
        data=args.data,
        models=models,
        contenders=contenders,
        infinity=args.infinity,
        llamacpp=_bench_bert_reranker(args.models_dir, args.data) if "llamacpp" in contenders else None,
        passages=args.passages,
        long_documents=args.long_documents,
        max_requests=args.max_requests,
        max_seconds=args.max_seconds,
        clients=args.clients,
        big_request=args.big_request,
        log_dir=args.models_dir / "logs",
        device=args.device,
    )
    result = run_bench(settings, " ".join(["rerankd", *sys.argv[1:]]))
    args.out.write_text(render_markdown(result))
    if args.json:
        args.json.write_text(render_json(result))
    print(f"wrote {args.out}")
    return 0


def _bench_bert_reranker(models_dir: Path, data: Path) -> tuple[Path, Path]:
    """The llama.cpp contender's model (transformers folder, GGUF), made once and kept in `models_dir`."""
    from rerankd.devtools.random_bert_gguf import bert_reranker_paths, write_bert_reranker
    from rerankd.quality.beir import load_beir

    folder = models_dir / "random-bert-minilm-l6"
    paths = bert_reranker_paths(folder)
    if not paths[1].is_file():
        dataset = load_beir(data)
        paths = write_bert_reranker(folder, [*dataset.passages.values(), *dataset.queries.values()])
    return paths
