"""Command line: `rerankd serve`, `rerankd rank`, `rerankd random-model`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rerankd import __version__
from rerankd.catalog import CATALOG, DEFAULT_MODEL
from rerankd.engine.tokenize import DEFAULT_CHUNK_OVERLAP

if TYPE_CHECKING:
    from rerankd.engine.engine import RerankEngine

DEFAULT_PORT = 8082


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="local model folder, or Hub id such as mixedbread-ai/mxbai-rerank-base-v1 "
        "(default: %(default)s)",
    )
    group.add_argument("--revision", default=None, help="Hub branch, tag or commit to pin (default: main)")
    _add_runtime_arguments(group)


def _add_runtime_arguments(group: argparse._ActionsContainer) -> None:
    """Where models are cached and how they run: shared by every command that loads a model."""
    group.add_argument(
        "--model-cache",
        type=Path,
        default=Path("models"),
        help="where Hub downloads are kept (default: %(default)s)",
    )
    group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype; auto = float16 on CUDA and bfloat16 on CPUs with AMX/AVX512-BF16 when the "
        "model's validation scores hold within 0.01 of float32, else float32 (default: %(default)s)",
    )
    group.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncate pairs to this many tokens (default: the model's, 512)",
    )
    group.add_argument(
        "--max-batch-tokens",
        type=_positive,
        default=None,
        help="padded tokens per forward pass, batch x longest pair (default: 1024 on CPU, 16384 on CUDA)",
    )
    group.add_argument(
        "--max-batch-pairs", type=_positive, default=64, help="pairs per forward pass (default: %(default)s)"
    )
    group.add_argument(
        "--batch-wait-ms",
        type=float,
        default=2.0,
        help="ms an idle queue waits to gather concurrent requests into one batch (default: %(default)s)",
    )
    group.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="CPU threads for the forward pass (default: torch's choice, one per core)",
    )


def _at_least(minimum: int, value: str) -> int:
    number = int(value)
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
    return number


def _positive(value: str) -> int:
    return _at_least(1, value)


def _non_negative(value: str) -> int:
    return _at_least(0, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerankd", description="Rerank inference server for cross-encoders."
    )
    parser.add_argument("--version", action="version", version=f"rerankd {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server")
    _add_model_arguments(serve)
    serve.add_argument(
        "--served-model-name", default=None, help="name clients use for the model (default: --model)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to bind (default: %(default)s)")
    serve.add_argument(
        "--max-documents", type=_positive, default=1000, help="documents per request (default: %(default)s)"
    )
    serve.add_argument(
        "--max-queued-pairs",
        type=_positive,
        default=None,
        help="pairs waiting per model; a request that would pass it gets 429 and Retry-After (default: none)",
    )
    serve.add_argument(
        "--max-chunks-per-doc",
        type=_positive,
        default=64,
        help="token windows per document in chunk mode, at most (default: %(default)s)",
    )
    serve.add_argument(
        "--chunk-overlap",
        type=_non_negative,
        default=DEFAULT_CHUNK_OVERLAP,
        help="tokens shared by consecutive windows of a chunked document (default: %(default)s)",
    )

    rank = commands.add_parser("rank", help="rank documents for a query and print the ranking")
    _add_model_arguments(rank)
    rank.add_argument("--query", required=True)
    rank.add_argument("documents", nargs="*", help="documents (default: one per line on standard input)")
    rank.add_argument("--top-n", type=_positive, default=None)
    rank.add_argument("--raw-scores", action="store_true", help="print logits instead of sigmoid scores")
    rank.add_argument("--json", action="store_true", help="print JSON instead of a table")

    export = commands.add_parser(
        "export", help="write a safetensors model as GGUF in the Antfly Inference layout"
    )
    export.add_argument("src", type=Path, help="a safetensors model folder")
    export.add_argument("out", type=Path, help="the .gguf file to write")
    export.add_argument("--type", dest="qtype", required=True, choices=["q8_0", "q4_k", "f16", "f32"])
    export.add_argument(
        "--keep",
        nargs="+",
        default=None,
        metavar="PREFIX",
        help="tensor-name prefixes kept unquantized (default for q8_0: embeddings.word_embeddings)",
    )

    validate = commands.add_parser(
        "validate", help="compare variants of a model with its base on the model card's validation cases"
    )
    validate.add_argument(
        "base", help="the reference model (folder, .gguf, Hub id, or served name with --url)"
    )
    validate.add_argument("variants", nargs="*", help="models to compare with the base")
    validate.add_argument(
        "--compare-dtypes",
        nargs="+",
        default=[],
        choices=["float32", "bfloat16", "float16"],
        help="also compare the base with itself run in these dtypes (set the base's with --dtype)",
    )
    validate.add_argument(
        "--url", default=None, help="score through a running rerankd; models are then its served model names"
    )
    validate.add_argument(
        "--data", type=Path, action="append", default=[], help="a BEIR folder whose passages add a case"
    )
    validate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    validate.add_argument(
        "--revision",
        default=None,
        help="Hub branch, tag or commit for the Hub models compared (default: main)",
    )
    _add_runtime_arguments(validate.add_argument_group("model"))

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
        "--contenders", nargs="+", default=None, help="subset of: rerankd st-fp32 st-bf16 infinity"
    )
    bench.add_argument(
        "--infinity", type=Path, default=None, help="the infinity_emb executable (its own venv)"
    )
    bench.add_argument("--passages", type=_positive, default=64, help="documents in the passages workload")
    bench.add_argument("--long-documents", type=_positive, default=16, help="documents in the long workload")
    bench.add_argument("--max-requests", type=_positive, default=3, help="timed requests per measurement")
    bench.add_argument(
        "--max-seconds", type=float, default=60.0, help="stop a measurement after this (≥1 request)"
    )
    bench.add_argument("--clients", type=_positive, default=8, help="concurrent clients")
    bench.add_argument(
        "--big-request", type=_positive, default=1000, help="documents in the fairness test's big request"
    )
    bench.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    bench.add_argument("--json", type=Path, default=None, help="also write the raw results here")

    random_model = commands.add_parser(
        "random-model", help="write a random-weight (untrained) model folder for tests and benchmarks"
    )
    random_model.add_argument("out", type=Path)
    random_model.add_argument("--geometry", choices=sorted(CATALOG), default="base")
    random_model.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="folder with the real tokenizer files (else one is trained)",
    )
    random_model.add_argument("--seed", type=int, default=0)
    random_model.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float16")
    random_model.add_argument("--num-labels", type=int, choices=[1, 2], default=1)
    random_model.add_argument(
        "--init-std",
        type=float,
        default=None,
        help="weight init std (default 0.02; wider spreads scores apart)",
    )
    return parser


def _load_engine(
    args: argparse.Namespace, model: str, served_name: str | None = None, dtype: str | None = None
) -> RerankEngine:
    from rerankd.backends.base import BackendOptions
    from rerankd.engine.loader import load_engine
    from rerankd.engine.scheduler import BatchLimits

    return load_engine(
        model,
        served_name=served_name,
        revision=getattr(args, "revision", None),
        cache_dir=args.model_cache,
        options=BackendOptions(device=args.device, dtype=dtype or args.dtype, threads=args.threads),
        max_length=args.max_length,
        batching=BatchLimits(
            args.max_batch_tokens,
            args.max_batch_pairs,
            args.batch_wait_ms,
            max_queued_pairs=getattr(args, "max_queued_pairs", None),
        ),
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from rerankd.api.app import APISettings, create_app
    from rerankd.engine.models import ServedModels

    engine = _load_engine(args, args.model, served_name=args.served_model_name)
    settings = APISettings(
        max_documents=args.max_documents,
        max_chunks_per_doc=args.max_chunks_per_doc,
        chunk_overlap=args.chunk_overlap,
    )
    app = create_app(ServedModels([engine]), settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _rank(args: argparse.Namespace) -> int:
    from rerankd.engine.postprocess import rank

    documents = args.documents or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not documents:
        print("rerankd rank: no documents given (as arguments or on standard input)", file=sys.stderr)
        return 2
    engine = _load_engine(args, args.model)
    try:
        scored = asyncio.run(engine.score(args.query, documents))
    finally:
        engine.close()
    ranked = rank(scored.logits, raw_scores=args.raw_scores, top_n=args.top_n)
    if args.json:
        results = [{"index": r.index, "score": r.score, "document": documents[r.index]} for r in ranked]
        print(json.dumps({"model": engine.name, "results": results}, indent=2))
        return 0
    print(f"{'rank':>4}  {'score':>10}  {'index':>5}  document")
    for position, item in enumerate(ranked, start=1):
        text = documents[item.index].replace("\n", " ")
        print(f"{position:>4}  {item.score:>10.6f}  {item.index:>5}  {text[:100]}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from rerankd.formats.gguf_writer import export_gguf

    export_gguf(args.src, args.out, args.qtype, keep=args.keep, progress=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from rerankd.fidelity import builtin_cases
    from rerankd.quality.scorers import EngineScorer, HTTPScorer, Scorer
    from rerankd.quality.validate import beir_case, render_table, results_json, validate

    if args.url and args.compare_dtypes:
        print(
            "rerankd validate: --compare-dtypes loads models in process; it cannot go with --url",
            file=sys.stderr,
        )
        return 2
    if not args.variants and not args.compare_dtypes:
        print("rerankd validate: name variants, or dtypes to compare with --compare-dtypes", file=sys.stderr)
        return 2

    def scorer_for(model: str, dtype: str | None = None) -> Callable[[], Scorer]:
        if args.url:
            return lambda: HTTPScorer(args.url, model)
        label = f"{model} ({dtype})" if dtype else model
        return lambda: EngineScorer(label, _load_engine(args, model, dtype=dtype))

    cases = builtin_cases() + [beir_case(folder) for folder in args.data]
    variants = [scorer_for(model) for model in args.variants]
    variants += [scorer_for(args.base, dtype) for dtype in args.compare_dtypes]
    results = validate(scorer_for(args.base), variants, cases)
    print(results_json(args.base, results) if args.json else render_table(args.base, results))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from rerankd.bench.report import render_json, render_markdown
    from rerankd.bench.run import CONTENDERS, BenchSettings, run_bench
    from rerankd.devtools.random_model import write_random_model

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress
    contenders = tuple(args.contenders or CONTENDERS)
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
        passages=args.passages,
        long_documents=args.long_documents,
        max_requests=args.max_requests,
        max_seconds=args.max_seconds,
        clients=args.clients,
        big_request=args.big_request,
        log_dir=args.models_dir / "logs",
    )
    result = run_bench(settings, " ".join(["rerankd", *sys.argv[1:]]))
    args.out.write_text(render_markdown(result))
    if args.json:
        args.json.write_text(render_json(result))
    print(f"wrote {args.out}")
    return 0


def _random_model(args: argparse.Namespace) -> int:
    import torch

    from rerankd.devtools.random_model import write_random_model

    out = write_random_model(
        args.out,
        geometry=args.geometry,
        tokenizer_dir=args.tokenizer,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        num_labels=args.num_labels,
        init_std=args.init_std,
    )
    print(f"wrote an untrained {args.geometry} model to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from rerankd.backends.base import ModelLoadError
    from rerankd.formats.gguf_writer import GGUFExportError
    from rerankd.hub import ModelSourceError

    handlers = {
        "serve": _serve,
        "rank": _rank,
        "export": _export,
        "validate": _validate,
        "bench": _bench,
        "random-model": _random_model,
    }
    try:
        return handlers[args.command](args)
    except (ModelSourceError, ModelLoadError, GGUFExportError) as error:
        print(f"rerankd: {error}", file=sys.stderr)
        return 1
