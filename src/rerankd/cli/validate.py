"""`rerankd validate`: the model card's drift table for variants of a model (or its dtypes)."""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any

from rerankd.cli.engines import scorer_for
from rerankd.cli.flags import add_settings_flags, runtime_settings
from rerankd.settings import RuntimeSettings


def add_parser(commands: Any) -> None:
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
        # Every dtype `--dtype` takes but auto, which is no dtype of its own.
        choices=[
            dtype
            for dtype in typing.get_args(RuntimeSettings.model_fields["dtype"].annotation)
            if dtype != "auto"
        ],
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
    validate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rerankd.fidelity import builtin_cases
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
    settings = runtime_settings(args)
    cases = builtin_cases() + [beir_case(folder) for folder in args.data]
    variants = [scorer_for(args.url, settings, model) for model in args.variants]
    variants += [scorer_for(args.url, settings, args.base, dtype) for dtype in args.compare_dtypes]
    results = validate(scorer_for(args.url, settings, args.base), variants, cases)
    print(results_json(args.base, results) if args.json else render_table(args.base, results))
    return 0
