"""`rerankd export`: a safetensors model written as GGUF in the Antfly Inference layout."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> None:
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
    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rerankd.formats.gguf_writer import export_gguf

    export_gguf(args.src, args.out, args.qtype, keep=args.keep, progress=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0
