"""`rerankd export`: a safetensors model written as GGUF in the Antfly Inference layout, or as ONNX graphs in
the transformers.js layout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

GGUF_TYPES = ("q8_0", "q4_k", "f16", "f32")


def add_parser(commands: Any) -> None:
    export = commands.add_parser(
        "export",
        help="write a safetensors model as GGUF (Antfly Inference layout) or ONNX (transformers.js layout)",
    )
    export.add_argument("src", type=Path, help="a safetensors model folder")
    export.add_argument(
        "out",
        type=Path,
        help="gguf: the .gguf file to write; onnx: the model folder to write (config.json, tokenizer files "
        "and onnx/model*.onnx; may be SRC itself)",
    )
    export.add_argument("--format", dest="file_format", choices=["gguf", "onnx"], default="gguf")
    export.add_argument(
        "--type",
        dest="qtype",
        nargs="+",
        required=True,
        help=f"gguf: one of {', '.join(GGUF_TYPES)}; onnx: one or more of f32 (onnx/model.onnx), f16 "
        "(model_fp16.onnx), int8 (model_int8.onnx), uint8 (model_uint8.onnx), dynamic quantization by "
        "onnxruntime",
    )
    export.add_argument(
        "--keep",
        nargs="+",
        default=None,
        metavar="PREFIX",
        help="gguf: tensor-name prefixes kept unquantized (default for q8_0: embeddings.word_embeddings)",
    )
    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.file_format == "onnx":
        if args.keep:
            print("rerankd export: --keep applies to GGUF exports only", file=sys.stderr)
            return 2
        return _export_onnx(args)
    if len(args.qtype) != 1 or args.qtype[0] not in GGUF_TYPES:
        print(f"rerankd export: --type takes one of {', '.join(GGUF_TYPES)} for gguf", file=sys.stderr)
        return 2
    from rerankd.formats.gguf_writer import export_gguf

    export_gguf(args.src, args.out, args.qtype[0], keep=args.keep, progress=True)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from rerankd.formats.onnx_export import OnnxExportError, export_onnx

    try:
        written = export_onnx(args.src, args.out, args.qtype, log=lambda line: print(line, file=sys.stderr))
    except OnnxExportError as error:
        print(f"rerankd export: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
