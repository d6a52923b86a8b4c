"""Command line: `rerankd serve`, `rerankd rank`, `rerankd random-model`."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rerankd import __version__
from rerankd.catalog import CATALOG, DEFAULT_MODEL
from rerankd.settings import RuntimeSettings, ServeSettings, add_settings_flags, given_flags, load_settings

if TYPE_CHECKING:
    from rerankd.engine.engine import RerankEngine
    from rerankd.engine.scheduler import BatchObserver


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model` (one) and the runtime settings, for commands that run one model in process."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="local model folder, or Hub id such as mixedbread-ai/mxbai-rerank-base-v1 "
        "(default: %(default)s)",
    )
    add_settings_flags(group, RuntimeSettings)


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

    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        description="Every setting also comes from RERANKD_<NAME> environment variables or a TOML file "
        "(--config); a flag wins over the environment, which wins over the file.",
    )
    serve.add_argument(
        "--config", type=Path, default=None, help="a TOML file of settings (env RERANKD_CONFIG)"
    )
    add_settings_flags(serve.add_argument_group("model"), RuntimeSettings)
    add_settings_flags(serve.add_argument_group("server"), ServeSettings)

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
    add_settings_flags(validate.add_argument_group("model"), RuntimeSettings)

    evaluate = commands.add_parser(
        "eval",
        help="measure reranking quality (nDCG@10, MRR@10, Recall@10/100) over BM25 on a BEIR folder, and the "
        "drift of model variants",
        description="Reranks BM25's top k of every judged query with each model (the first is the base the "
        "others' drift is measured against) and prints the quality and drift tables.",
    )
    evaluate.add_argument(
        "--data", type=Path, required=True, help="a BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv"
    )
    evaluate.add_argument("--split", default="test", help="read qrels/SPLIT.tsv (default: %(default)s)")
    evaluate.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        metavar="MODEL[@DTYPE]",
        help="a reranker (repeatable): folder, .gguf or Hub id, optionally @float32, @bfloat16 or @float16; "
        "with --url, a served model name. None: BM25 alone",
    )
    evaluate.add_argument(
        "--url", default=None, help="score through a running rerankd; models are then its served model names"
    )
    evaluate.add_argument("--first-stage", choices=["bm25"], default="bm25", help="(default: %(default)s)")
    evaluate.add_argument(
        "--k", type=_positive, default=100, help="candidates reranked per query (default: %(default)s)"
    )
    evaluate.add_argument(
        "--queries", type=_positive, default=None, help="evaluate only the first N judged queries"
    )
    evaluate.add_argument(
        "--json", type=Path, default=None, metavar="FILE", help="also write the results here"
    )
    evaluate.add_argument(
        "--markdown", type=Path, default=None, metavar="FILE", help="also write the tables here"
    )
    evaluate.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="score drift and nDCG@10 per query (matplotlib)",
    )
    add_settings_flags(evaluate.add_argument_group("model"), RuntimeSettings)

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
    bench.add_argument("--passages", type=_positive, default=64, help="documents in the passages workload")
    bench.add_argument("--long-documents", type=_positive, default=16, help="documents in the long workload")
    bench.add_argument(
        "--max-requests",
        type=_positive,
        default=None,
        help="timed requests per measurement, split among its clients (default: 3 on a CPU, 100 on CUDA)",
    )
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


def _runtime(args: argparse.Namespace) -> RuntimeSettings:
    return load_settings(RuntimeSettings, given_flags(args, RuntimeSettings))


def _load_engine(
    runtime: RuntimeSettings,
    model: str,
    served_name: str | None = None,
    dtype: str | None = None,
    max_queued_pairs: int | None = None,
    on_batch: BatchObserver | None = None,
) -> RerankEngine:
    from rerankd.backends.base import BackendOptions
    from rerankd.engine.loader import load_engine
    from rerankd.engine.scheduler import BatchLimits

    return load_engine(
        model,
        served_name=served_name,
        revision=runtime.revision,
        cache_dir=runtime.model_cache,
        options=BackendOptions(
            device=runtime.device,
            dtype=dtype or runtime.dtype,
            threads=runtime.threads,
            backend=runtime.backend,
            cuda_graphs=runtime.cuda_graphs,
        ),
        max_length=runtime.max_length,
        batching=BatchLimits(
            runtime.max_batch_tokens,
            runtime.max_batch_pairs,
            runtime.batch_wait_ms,
            max_queued_pairs=max_queued_pairs,
        ),
        on_batch=on_batch,
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from rerankd.api.app import APISettings, create_app
    from rerankd.engine.models import ServedModels
    from rerankd.logs import configure_logging
    from rerankd.metrics import ServerMetrics

    try:
        settings = load_settings(ServeSettings, given_flags(args, ServeSettings), args.config)
    except (ValidationError, ValueError) as error:
        print(f"rerankd serve: invalid settings: {error}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, settings.log_format)
    metrics = ServerMetrics()

    def load(name: str, reference: str) -> RerankEngine:
        return _load_engine(
            settings,
            reference,
            served_name=name,
            max_queued_pairs=settings.max_queued_pairs,
            on_batch=metrics.batch_observer(name),
        )

    api_settings = APISettings(
        max_documents=settings.max_documents,
        max_document_chars=settings.max_document_chars,
        max_request_bytes=settings.max_request_bytes,
        max_chunks_per_doc=settings.max_chunks_per_doc,
        chunk_overlap=settings.chunk_overlap,
        request_timeout=settings.request_timeout,
        api_keys=tuple(settings.api_key),
        metrics_auth=settings.metrics_auth,
        cors_origins=tuple(settings.cors_origin),
        log_format=settings.log_format,
    )
    config = uvicorn.Config(
        app=None,  # set below, once the server exists for the loader to stop it
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        access_log=False,  # rerankd logs one structured line per request itself
        log_config=None,
        timeout_graceful_shutdown=settings.shutdown_timeout,
    )
    server = uvicorn.Server(config)
    no_model = {"failed": False}

    def stop_without_models() -> None:
        logging.getLogger("rerankd").error("no model could be loaded; stopping")
        no_model["failed"] = True
        server.should_exit = True

    config.app = create_app(
        ServedModels.pending(settings.served_models()),
        api_settings,
        loader=load,
        metrics=metrics,
        warmup=settings.warmup,
        on_no_model=stop_without_models,
    )
    # uvicorn finishes in-flight requests on SIGTERM (within --shutdown-timeout), then re-raises the signal
    # to the handler it found: this one, so that a graceful stop exits 0.
    signal.signal(signal.SIGTERM, _exit_gracefully)
    server.run()
    return 1 if no_model["failed"] else 0


def _exit_gracefully(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _rank(args: argparse.Namespace) -> int:
    from rerankd.engine.postprocess import rank

    documents = args.documents or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not documents:
        print("rerankd rank: no documents given (as arguments or on standard input)", file=sys.stderr)
        return 2
    engine = _load_engine(_runtime(args), args.model)
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

    runtime = _runtime(args)

    def scorer_for(model: str, dtype: str | None = None) -> Callable[[], Scorer]:
        if args.url:
            return lambda: HTTPScorer(args.url, model)
        label = f"{model} ({dtype})" if dtype else model
        return lambda: EngineScorer(label, _load_engine(runtime, model, dtype=dtype))

    cases = builtin_cases() + [beir_case(folder) for folder in args.data]
    variants = [scorer_for(model) for model in args.variants]
    variants += [scorer_for(args.base, dtype) for dtype in args.compare_dtypes]
    results = validate(scorer_for(args.base), variants, cases)
    print(results_json(args.base, results) if args.json else render_table(args.base, results))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import importlib.util

    import httpx

    from rerankd.quality.beir import BeirError, load_judged_beir
    from rerankd.quality.eval import evaluate, split_model_spec
    from rerankd.quality.report import render_markdown, render_tables, report_json, write_plot
    from rerankd.quality.scorers import EngineScorer, HTTPScorer, Scorer

    def fail(message: str) -> int:
        print(f"rerankd eval: {message}", file=sys.stderr)
        return 2

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return fail("--plot needs matplotlib: pip install 'rerankd[plot]'")
    specs = [(spec, None) if args.url else split_model_spec(spec) for spec in args.models]
    if args.url and not specs:
        return fail("--url needs the served model names to evaluate, as --model NAME")
    try:
        data = load_judged_beir(args.data, args.split)
    except BeirError as error:
        return fail(str(error))
    for note in data.warnings():
        print(f"rerankd eval: warning: {note}", file=sys.stderr)
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs each indexing step at DEBUG, whatever ours
    runtime = _runtime(args)

    def scorer_for(label: str, model: str, dtype: str | None) -> Callable[[], Scorer]:
        if args.url:
            return lambda: HTTPScorer(args.url, model)
        return lambda: EngineScorer(label, _load_engine(runtime, model, dtype=dtype))

    rerankers = [scorer_for(spec, *split) for spec, split in zip(args.models, specs, strict=True)]
    try:
        report = evaluate(data, rerankers, args.k, args.queries, progress=sys.stderr.isatty())
    except (httpx.HTTPError, RuntimeError) as error:
        if not args.url:
            raise
        print(f"rerankd eval: {args.url}: {error}", file=sys.stderr)  # unreachable, or a refused request
        return 1
    print(render_tables(report))
    if args.json:
        args.json.write_text(report_json(report))
    if args.markdown:
        args.markdown.write_text(render_markdown(report, " ".join(["rerankd", *sys.argv[1:]])))
    if args.plot:
        write_plot(report, args.plot)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import torch

    from rerankd.bench.report import render_json, render_markdown
    from rerankd.bench.run import CONTENDERS, DEFAULT_CONTENDERS, BenchSettings, run_bench
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
        "eval": _eval,
        "bench": _bench,
        "random-model": _random_model,
    }
    try:
        return handlers[args.command](args)
    except (ModelSourceError, ModelLoadError, GGUFExportError) as error:
        print(f"rerankd: {error}", file=sys.stderr)
        return 1
