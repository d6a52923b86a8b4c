"""`rerankd random-model`: a random-weight (untrained) model folder at a real geometry."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rerankd.catalog import CATALOG


def add_parser(commands: Any) -> None:
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
    random_model.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
