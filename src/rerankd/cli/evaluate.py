"""`rerankd eval`: reranking quality over BM25 on a BEIR folder, and the drift of model variants."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from rerankd.cli.engines import scorer_for
from rerankd.cli.flags import add_settings_flags, positive, runtime_settings
from rerankd.settings import RuntimeSettings


def add_parser(commands: Any) -> None:
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
        "--k", type=positive, default=100, help="candidates reranked per query (default: %(default)s)"
    )
    evaluate.add_argument(
        "--queries", type=positive, default=None, help="evaluate only the first N judged queries"
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
    evaluate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import httpx

    from rerankd.quality.beir import BeirError, load_judged_beir
    from rerankd.quality.eval import evaluate, split_model_spec
    from rerankd.quality.report import render_markdown, render_tables, report_json, write_plot

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
    settings = runtime_settings(args)
    rerankers = [
        scorer_for(args.url, settings, model, dtype, label=spec)
        for spec, (model, dtype) in zip(args.models, specs, strict=True)
    ]
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
