"""`rerankd random-model`: a random-weight (untrained) model folder at a real geometry."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rerankd.catalog import CATALOG, CAUSAL_FAMILY_MODELS, ENCODER_FAMILY_MODELS


def add_parser(commands: Any) -> None:
    random_model = commands.add_parser(
        "random-model", help="write a random-weight (untrained) model folder for tests and benchmarks"
    )
    random_model.add_argument("out", type=Path)
    random_model.add_argument(
        "--family",
        choices=["deberta-v2", *ENCODER_FAMILY_MODELS, *CAUSAL_FAMILY_MODELS],
        default="deberta-v2",
        help="the network: DeBERTa-v3 (mxbai-rerank-v1) at --geometry, or another encoder family or an LLM "
        "reranker, tiny or at its published model's geometry (--geometry published)",
    )
    random_model.add_argument("--geometry", choices=[*sorted(CATALOG), "tiny", "published"], default="base")
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

    from rerankd.devtools.random_causal import write_random_causal
    from rerankd.devtools.random_encoders import write_random_encoder
    from rerankd.devtools.random_model import write_random_model

    if args.family != "deberta-v2":
        if args.geometry not in ("tiny", "published"):
            raise SystemExit(f"--family {args.family} takes --geometry tiny or published")
        published = args.geometry == "published"
        if args.family in CAUSAL_FAMILY_MODELS:
            out = write_random_causal(args.out, args.family, published, seed=args.seed)
        else:
            out = write_random_encoder(
                args.out, args.family, published, seed=args.seed, num_labels=args.num_labels
            )
        print(f"wrote an untrained {args.geometry} {args.family} model to {out}")
        return 0
    if args.geometry not in CATALOG:
        raise SystemExit(
            f"--geometry {args.geometry} is for the other families; DeBERTa's: {sorted(CATALOG)}"
        )
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
