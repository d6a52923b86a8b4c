"""`rerankd rank`: rank documents for a query in process and print the ranking."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from rerankd.catalog import DEFAULT_MODEL
from rerankd.cli.engines import load_model
from rerankd.cli.flags import add_settings_flags, positive, runtime_settings
from rerankd.settings import RuntimeSettings


def add_parser(commands: Any) -> None:
    rank = commands.add_parser("rank", help="rank documents for a query and print the ranking")
    group = rank.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="local model folder, or Hub id such as mixedbread-ai/mxbai-rerank-base-v1 "
        "(default: %(default)s)",
    )
    add_settings_flags(group, RuntimeSettings)
    rank.add_argument("--query", required=True)
    rank.add_argument("documents", nargs="*", help="documents (default: one per line on standard input)")
    rank.add_argument("--top-n", type=positive, default=None)
    rank.add_argument("--raw-scores", action="store_true", help="print logits instead of sigmoid scores")
    rank.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rank.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rerankd.engine.postprocess import rank

    documents = args.documents or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not documents:
        print("rerankd rank: no documents given (as arguments or on standard input)", file=sys.stderr)
        return 2
    engine = load_model(runtime_settings(args), args.model)
    try:
        scored = asyncio.run(engine.score(args.query, documents))
    finally:
        engine.close()
    ranked = rank(scored.documents, raw_scores=args.raw_scores, top_n=args.top_n)
    if args.json:
        results = [{"index": r.index, "score": r.score, "document": documents[r.index]} for r in ranked]
        print(json.dumps({"model": engine.name, "results": results}, indent=2))
        return 0
    print(f"{'rank':>4}  {'score':>10}  {'index':>5}  document")
    for position, item in enumerate(ranked, start=1):
        text = documents[item.index].replace("\n", " ")
        print(f"{position:>4}  {item.score:>10.6f}  {item.index:>5}  {text[:100]}")
    return 0
