"""Command line: one module per command (`add_parser` declares its flags, `run` carries it out)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rerankd import __version__
from rerankd.cli import (
    bench,
    download,
    evaluate,
    export,
    random_model,
    rank,
    ray_serve,
    rerank_batch,
    serve,
    validate,
)

COMMANDS = (serve, ray_serve, download, rank, rerank_batch, export, validate, evaluate, bench, random_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rerankd", description="Rerank inference server for cross-encoders."
    )
    parser.add_argument("--version", action="version", version=f"rerankd {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.run(args))
    except Exception as error:
        # Imported only now: they load torch, which takes seconds that `serve` must not spend before it
        # catches its stop signals.
        from rerankd.backends.base import ModelLoadError
        from rerankd.formats.gguf_writer import GGUFExportError
        from rerankd.hub import ModelSourceError

        if not isinstance(error, ModelSourceError | ModelLoadError | GGUFExportError):
            raise
        print(f"rerankd: {error}", file=sys.stderr)
        return 1
