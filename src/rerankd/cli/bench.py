"""`rerankd bench`: rerankd against its peers, random-weight models at the real geometries; BENCHMARKS.md."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from rerankd.catalog import CATALOG, CAUSAL_FAMILY_MODELS, ENCODER_FAMILY_MODELS
from rerankd.cli.flags import positive

FAMILIES = (*ENCODER_FAMILY_MODELS, *CAUSAL_FAMILY_MODELS)
DEFAULT_GEOMETRIES = ("base", "xsmall")
# The pieces of the bench's XLM-R SentencePiece model, trained on the corpus (the embedding table keeps the
# published model's 250,002 rows).
XLM_ROBERTA_PIECES = 8000


def add_parser(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="benchmark rerankd against sentence-transformers, Infinity and each family's reference; "
        "write BENCHMARKS.md",
    )
    bench.add_argument(
        "--geometry",
        action="append",
        choices=[*sorted(CATALOG), "none"],
        default=None,
        help="a DeBERTa (mxbai-rerank-v1) section; none: no DeBERTa section (default: base and xsmall)",
    )
    bench.add_argument(
        "--family",
        action="append",
        choices=[*FAMILIES, "none"],
        default=None,
        help="a section for another family at its published model's geometry; none: no such section "
        "(default: every family)",
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
        help="subset of: rerankd (as --dtype auto serves) rerankd-fp32 rerankd-bf16 rerankd-mixed "
        "rerankd-int8 (DeBERTa pinned to float32, bfloat16, bfloat16-mixed, int8) st-fp32 st-bf16 st-fp16 "
        "ort-fp32 ort-int8 openvino openvino-f32 (ONNX Runtime and OpenVINO on the ONNX export; openvino-f32 "
        "where OpenVINO's default is bf16) infinity llamacpp (the BERT section's GGUF on the llama.cpp "
        "backend) qwen3-card mxbai-rerank (the LLM rerankers' references); default: all but st-fp16 on a CPU "
        "(and without rerankd-bf16, rerankd-mixed and st-bf16 where it has no bf16 units); rerankd, st-fp32, "
        "st-fp16, infinity and the LLM references on CUDA",
    )
    bench.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where every contender runs (default: cpu)"
    )
    bench.add_argument(
        "--infinity", type=Path, default=None, help="the infinity_emb executable (its own venv)"
    )
    bench.add_argument(
        "--mxbai-python",
        type=Path,
        default=Path(".venv-mxbai/bin/python"),
        help="a Python with the mxbai-rerank package (it needs transformers 4.x; `make install-test` builds "
        "one)",
    )
    bench.add_argument("--passages", type=positive, default=64, help="documents in the passages workload")
    bench.add_argument("--long-documents", type=positive, default=16, help="documents in the long workload")
    bench.add_argument(
        "--family-passages",
        type=positive,
        default=16,
        help="documents in the other families' passages workload",
    )
    bench.add_argument(
        "--family-long-documents",
        type=positive,
        default=4,
        help="documents in the other families' long workload",
    )
    bench.add_argument(
        "--max-requests",
        type=positive,
        default=None,
        help="timed requests per measurement, split among its clients (default: 3 on a CPU, 100 on CUDA)",
    )
    bench.add_argument(
        "--max-seconds", type=float, default=60.0, help="stop a measurement after this (≥1 request)"
    )
    bench.add_argument("--clients", type=positive, default=8, help="concurrent clients")
    bench.add_argument(
        "--big-request", type=positive, default=1000, help="documents in the fairness test's big request"
    )
    bench.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    bench.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    bench.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="measure nothing: write the report again from a run's raw results (--json), e.g. after a change "
        "to the report",
    )
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from rerankd.backends.torch_backend import cpu_has_bf16_units
    from rerankd.bench.report import render_json, render_markdown
    from rerankd.bench.results import result_from_json
    from rerankd.bench.run import run_bench
    from rerankd.bench.settings import (
        BF16_CONTENDERS,
        CONTENDERS,
        DEFAULT_CONTENDERS,
        ONNX_CONTENDERS,
        BenchSettings,
    )

    if args.from_json is not None:
        args.out.write_text(render_markdown(result_from_json(args.from_json.read_text())))
        print(f"wrote {args.out} from {args.from_json}")
        return 0
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress
    if args.device == "cuda" and not torch.cuda.is_available():
        print("rerankd bench: --device cuda: CUDA is not available on this machine", file=sys.stderr)
        return 2
    contenders = tuple(args.contenders or DEFAULT_CONTENDERS[args.device])
    if args.contenders is None and args.device == "cpu" and not cpu_has_bf16_units():
        # torch emulates bf16 there, at a tenth of fp32's rate: nothing a user of this CPU would pick.
        print(
            f"rerankd bench: no {', '.join(BF16_CONTENDERS)} by default: this CPU has no bf16 units",
            file=sys.stderr,
        )
        contenders = tuple(contender for contender in contenders if contender not in BF16_CONTENDERS)
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
    families = _chosen(args.family, FAMILIES)
    if "mxbai-rerank-v2" in families and "mxbai-rerank" in contenders and not args.mxbai_python.is_file():
        print(f"rerankd bench: skipping mxbai-rerank: no {args.mxbai_python}", file=sys.stderr)
        contenders = tuple(contender for contender in contenders if contender != "mxbai-rerank")
    settings = BenchSettings(
        data=args.data,
        models={
            geometry: _deberta_model(args.models_dir, geometry, args.tokenizer)
            for geometry in _chosen(args.geometry, DEFAULT_GEOMETRIES)
        },
        contenders=contenders,
        infinity=args.infinity,
        families={
            family: _family_model(args.models_dir, family, args.data, "llamacpp" in contenders)
            for family in families
        },
        peer_pythons={"mxbai-rerank": args.mxbai_python},
        passages=args.passages,
        long_documents=args.long_documents,
        family_passages=args.family_passages,
        family_long_documents=args.family_long_documents,
        max_requests=args.max_requests,
        max_seconds=args.max_seconds,
        clients=args.clients,
        big_request=args.big_request,
        log_dir=args.models_dir / "logs",
        device=args.device,
        bf16_units=args.device == "cpu" and cpu_has_bf16_units(),
    )
    if set(ONNX_CONTENDERS) & set(contenders):
        for folder in settings.models.values():
            _onnx_export(folder)
    result = run_bench(settings, " ".join(["rerankd", *sys.argv[1:]]))
    args.out.write_text(render_markdown(result))
    if args.json:
        args.json.write_text(render_json(result))
    print(f"wrote {args.out}")
    return 0


def _chosen(asked: list[str] | None, default: tuple[str, ...]) -> list[str]:
    """The sections a repeatable flag asked for, its default when not given, none for `none`."""
    return [name for name in asked or default if name != "none"]


def _deberta_model(models_dir: Path, geometry: str, tokenizer: Path) -> Path:
    """A random-weight mxbai-rerank-v1 at `geometry` with the real tokenizer, made once in `models_dir`."""
    from rerankd.devtools.random_model import write_random_model

    folder = models_dir / f"random-{geometry}"
    if not (folder / "config.json").is_file():
        write_random_model(folder, geometry=geometry, tokenizer_dir=tokenizer)
    return folder


def _onnx_export(folder: Path) -> None:
    """The float32 and dynamic int8 ONNX graphs of a bench model in its onnx/, made once."""
    from rerankd.formats.onnx_export import EXPORT_TYPES, export_onnx
    from rerankd.formats.onnx_graph import find_onnx_file

    missing = [kind for kind in ("f32", "int8") if find_onnx_file(folder, EXPORT_TYPES[kind]) is None]
    if missing:
        export_onnx(folder, folder, missing, log=lambda line: print(line, file=sys.stderr))


def _family_model(models_dir: Path, family: str, data: Path, llamacpp: bool) -> tuple[Path, Path | None]:
    """A family's random-weight model at its published geometry, made once in `models_dir`: its transformers
    folder and, with `llamacpp`, the same weights as a GGUF the llama.cpp backend serves right: BERT's in
    llama.cpp's layout with its pooler (the converter drops it), XLM-R's and ModernBERT's as llama.cpp's own
    converter writes them. BERT's WordPiece and XLM-R's SentencePiece model (what the converter reads) are
    trained on the corpus, as a real vocabulary would split it."""
    from rerankd.devtools.llamacpp_convert import CONVERTER, convert_to_gguf
    from rerankd.devtools.random_causal import write_random_causal
    from rerankd.devtools.random_encoders import write_random_encoder, write_sentencepiece_xlm_roberta
    from rerankd.quality.beir import load_beir

    folder = models_dir / f"random-{family}"
    if family == "bert":
        return _bench_bert_reranker(folder, data)
    if family == "xlm-roberta" and not (folder / "sentencepiece.bpe.model").is_file():
        dataset = load_beir(data)
        texts = [*dataset.passages.values(), *dataset.queries.values()]
        write_sentencepiece_xlm_roberta(folder, texts, published=True, vocab_size=XLM_ROBERTA_PIECES)
    elif not (folder / "config.json").is_file():
        write = write_random_causal if family in CAUSAL_FAMILY_MODELS else write_random_encoder
        write(folder, family, published=True)
    if family not in ("xlm-roberta", "modernbert") or not llamacpp:
        return folder, None
    if not CONVERTER.is_file():
        print(f"rerankd bench: no llama.cpp row for {family}: no converter at {CONVERTER}", file=sys.stderr)
        return folder, None
    gguf_dir = models_dir / f"random-{family}-gguf"
    gguf_path = gguf_dir / f"{folder.name}.F32.gguf"
    return folder, gguf_path if gguf_path.is_file() else convert_to_gguf(folder, family, gguf_dir)


def _bench_bert_reranker(folder: Path, data: Path) -> tuple[Path, Path]:
    """The BERT section's model (transformers folder, the same as GGUF), made once in `folder`."""
    from rerankd.devtools.random_bert_gguf import bert_reranker_paths, write_bert_reranker
    from rerankd.quality.beir import load_beir

    paths = bert_reranker_paths(folder)
    if not paths[1].is_file():
        dataset = load_beir(data)
        paths = write_bert_reranker(folder, [*dataset.passages.values(), *dataset.queries.values()])
    return paths
