"""`rerankd export --format onnx`: a safetensors reranker written as ONNX graphs in the transformers.js layout
(`onnx/model.onnx`, `onnx/model_fp16.onnx`, `onnx/model_int8.onnx`, …, config.json and the tokenizer files
beside them), which the ONNX backend serves with the `:onnx[:variant]` selectors.

The float32 graph is `transformers`' own sequence classifier (the reference the fidelity bounds are stated
against) traced by torch's ONNX exporter (`torch.onnx.export(dynamo=True)`, the one torch maintains), with
a dynamic batch and sequence axis; the other variants are made from it by onnxruntime's tools, as optimum
and transformers.js make theirs: float16 by `onnxruntime.transformers.float16` (inputs and output kept in
their types), int8 and uint8 by `onnxruntime.quantization.quantize_dynamic` (per-channel weights, dynamic
activations).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from rerankd.formats.onnx_graph import ONNX_FOLDER, onnx_file_name
from rerankd.modeling.causal import causal_family

# `--type` -> the transformers.js variant it writes (None: model.onnx).
EXPORT_TYPES: dict[str, str | None] = {"f32": None, "f16": "fp16", "int8": "int8", "uint8": "uint8"}
# Beside the graphs: what the ONNX backend reads to tokenize and to know the family.
MODEL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spm.model",
    "vocab.txt",
)
# protobuf caps one file at 2 GB: larger graphs keep their weights in `<graph>_data` beside it.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
OPSET = 18
# The traced example: two pairs of sixteen tokens (any ids the vocabulary has).
EXAMPLE_SHAPE = (2, 16)


class OnnxExportError(Exception):
    """A model this exporter cannot write; the message names it and why."""


def export_onnx(
    source: Path, out: Path, types: Sequence[str], log: Callable[[str], None] = lambda _: None
) -> list[Path]:
    """Write `source`'s model as the graphs of `types` (keys of EXPORT_TYPES) into `out` (which may be
    `source` itself: the graphs go into its `onnx/`); returns the graphs written."""
    unknown = [kind for kind in types if kind not in EXPORT_TYPES]
    if unknown or not types:
        raise OnnxExportError(f"export types {unknown or 'none'}: choose from {', '.join(EXPORT_TYPES)}")
    missing = [module for module in ("onnxscript", "onnxruntime") if importlib.util.find_spec(module) is None]
    if missing:
        raise OnnxExportError(f"the ONNX export needs {' and '.join(missing)}: pip install 'rerankd[onnx]'")
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != source.resolve():
        for name in MODEL_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
    graphs = out / ONNX_FOLDER
    graphs.mkdir(exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(dir=graphs) as scratch:
        float32 = graphs / onnx_file_name(None) if "f32" in types else Path(scratch) / "model.onnx"
        log(f"tracing {source} to {float32.name} (float32)")
        trace_float32_graph(source, float32)
        if "f32" in types:
            written.append(float32)
        for kind in types:
            variant = EXPORT_TYPES[kind]
            if variant is None:
                continue
            path = graphs / onnx_file_name(variant)
            log(f"writing {path.name} ({kind})")
            if kind == "f16":
                _convert_to_float16(float32, path)
            else:
                _quantize_dynamic(float32, path, kind)
            written.append(path)
    return written


def trace_float32_graph(source: Path, path: Path) -> None:
    """`transformers`' sequence classifier of `source`, loaded in float32, as an ONNX graph at `path`:
    inputs input_ids, attention_mask (and token_type_ids where its forward takes them), output logits."""
    from transformers import AutoModelForSequenceClassification

    config_path = source / "config.json"
    if not config_path.is_file():
        raise OnnxExportError(f"{source}: no config.json: export takes a safetensors model folder")
    config = json.loads(config_path.read_text())
    llm = causal_family(config)
    if llm is not None:
        raise OnnxExportError(
            f"{source}: {llm.name} is an LLM reranker; the ONNX backend serves sequence classifiers "
            "(DeBERTa, BERT, ELECTRA, RoBERTa/XLM-RoBERTa, ModernBERT)"
        )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as error:
        raise OnnxExportError(f"{source}: transformers could not load the model: {error}") from error
    classifier = LogitsOnly(model)
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        names.append("token_type_ids")
    example = {name: torch.ones(EXAMPLE_SHAPE, dtype=torch.int64) for name in names}
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > PROTOBUF_LIMIT_BYTES * 0.9
    with torch.no_grad():
        torch.onnx.export(
            classifier,
            (),
            str(path),
            kwargs=example,
            input_names=names,
            output_names=["logits"],
            dynamic_shapes={name: {0: batch, 1: sequence} for name in names},
            opset_version=OPSET,
            dynamo=True,
            external_data=external,
        )


class LogitsOnly(torch.nn.Module):
    """The classifier's forward, returning only its logits: the graph's one output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **types).logits


def _convert_to_float16(float32: Path, path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(float32)), keep_io_types=True)
    _save(model, path)


def _quantize_dynamic(float32: Path, path: Path, kind: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_type = QuantType.QInt8 if kind == "int8" else QuantType.QUInt8
    quantize_dynamic(
        float32,
        path,
        weight_type=weight_type,
        per_channel=True,
        use_external_data_format=float32.stat().st_size > PROTOBUF_LIMIT_BYTES * 0.9,
    )


def _save(model: Any, path: Path) -> None:
    import onnx

    external = model.ByteSize() > PROTOBUF_LIMIT_BYTES * 0.9
    onnx.save(model, str(path), save_as_external_data=external, location=f"{path.name}_data")
