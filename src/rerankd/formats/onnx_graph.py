"""ONNX reranker files: where a model folder keeps them, and what a graph must offer the engine.

The layout is transformers.js's, which Mixedbread and most Hub repos publish: `onnx/model.onnx` (float32)
beside `onnx/model_<variant>.onnx` (`fp16`, `quantized`, `int8`, `uint8`, `q4`, …), config.json and the
tokenizer files at the folder's root; optimum's exports keep `model.onnx` at the root. Weights past
protobuf's 2 GB limit live in external data files beside the graph (`model.onnx_data`).

A graph is checked here, before a runtime loads it, so that what rerankd cannot feed or read is refused
naming the file and the reason, not with a runtime's error deep in a session: it must take `input_ids` and
`attention_mask` (and may take `token_type_ids`), each a (batch, sequence) integer tensor, and give logits
of a static shape (batch, 1) or (batch, 2).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

ONNX_FOLDER = "onnx"
FLOAT32_VARIANTS = ("fp32", "f32", "float32")
REQUIRED_INPUTS = ("input_ids", "attention_mask")
OPTIONAL_INPUTS = ("token_type_ids",)
LOGITS_OUTPUT = "logits"
_FILE_NAME = re.compile(r"model(?:_(?P<variant>[a-z0-9]+))?\.onnx")
_INTEGER_TYPES: dict[int, np.dtype] = {
    onnx.TensorProto.INT64: np.dtype(np.int64),
    onnx.TensorProto.INT32: np.dtype(np.int32),
}
# What a graph's weights are, by the element type most of their values have.
_WEIGHT_TYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
}


class OnnxModelError(Exception):
    """An ONNX file rerankd cannot serve; the message names the file and why."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class RerankerGraph:
    """What the engine feeds a checked graph and reads from it."""

    path: Path
    inputs: dict[str, np.dtype]  # input name -> the integer type it takes, in the graph's order
    output: str
    labels: int  # 1: the logit; 2: label 1 minus label 0
    weight_type: str  # "float32", "float16", "int8", …: what most of its weights are stored as


def onnx_file_name(variant: str | None) -> str:
    """`model.onnx` for float32 (no variant), else transformers.js's `model_<variant>.onnx`."""
    if variant is None or variant.lower() in FLOAT32_VARIANTS:
        return "model.onnx"
    return f"model_{variant.lower()}.onnx"


def onnx_variants(folder: Path) -> dict[str, Path]:
    """The folder's ONNX graphs by variant (`fp32` for `model.onnx`), in `onnx/` or at its root."""
    found: dict[str, Path] = {}
    for where in (folder, folder / ONNX_FOLDER):
        if not where.is_dir():
            continue
        for path in sorted(where.glob("*.onnx")):
            match = _FILE_NAME.fullmatch(path.name)
            if match is not None:
                found.setdefault(match["variant"] or "fp32", path)
    return found


def find_onnx_file(folder: Path, variant: str | None) -> Path | None:
    """The folder's graph of that variant (float32 without one); None when it has none."""
    name = onnx_file_name(variant)
    for candidate in (folder / ONNX_FOLDER / name, folder / name):
        if candidate.is_file():
            return candidate
    return None


def model_folder_of(graph: Path) -> Path:
    """Where a graph's config.json and tokenizer are: its own folder, or the one above `onnx/`."""
    folder = graph.parent
    if folder.name == ONNX_FOLDER and not (folder / "config.json").is_file():
        return folder.parent
    return folder


def inspect_reranker_graph(path: Path) -> RerankerGraph:
    """Check that rerankd can feed and read the graph at `path` (its external data present); OnnxModelError
    naming the file otherwise."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as error:  # onnx reports unparsable files as these
        raise OnnxModelError(path, f"not an ONNX model ({error})") from error
    except OSError as error:
        raise OnnxModelError(path, f"cannot be read ({error})") from error
    _check_external_data(path, model)
    graph = model.graph
    weights = {tensor.name for tensor in graph.initializer}
    inputs = {value.name: value for value in graph.input if value.name not in weights}
    missing = [name for name in REQUIRED_INPUTS if name not in inputs]
    if missing:
        raise OnnxModelError(
            path,
            f"the graph has no input {' and no input '.join(map(repr, missing))} (its inputs: "
            f"{', '.join(inputs) or 'none'}); a reranker takes input_ids and attention_mask "
            "(and token_type_ids where the model reads them)",
        )
    unknown = [name for name in inputs if name not in REQUIRED_INPUTS + OPTIONAL_INPUTS]
    if unknown:
        raise OnnxModelError(
            path,
            f"the graph takes input {', '.join(map(repr, unknown))}, which rerankd does not feed (it feeds "
            f"{', '.join(REQUIRED_INPUTS + OPTIONAL_INPUTS)}): export the model with only those inputs",
        )
    input_types = {name: _integer_input(path, value) for name, value in inputs.items()}
    outputs = {value.name: value for value in graph.output}
    if not outputs:
        raise OnnxModelError(path, "the graph has no output")
    name = LOGITS_OUTPUT if LOGITS_OUTPUT in outputs else next(iter(outputs))
    return RerankerGraph(path, input_types, name, _labels(path, outputs[name]), _weight_type(model))


def _check_external_data(path: Path, model: onnx.ModelProto) -> None:
    """Every external data file the graph names exists beside it and holds what the graph reads from it."""
    sizes: dict[str, int] = {}
    for tensor in _weight_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        location = path.parent / info.location
        if info.location not in sizes:
            if not location.is_file():
                raise OnnxModelError(
                    path,
                    f"its weights are stored in the external data file {info.location}, which is missing "
                    f"(expected at {location}): download it beside the graph",
                )
            sizes[info.location] = location.stat().st_size
        end = (info.offset or 0) + (info.length or 0)
        if end > sizes[info.location]:
            raise OnnxModelError(
                path,
                f"the external data file {info.location} ends at byte {sizes[info.location]}, but tensor "
                f"{tensor.name!r} is read up to byte {end}: the file is truncated",
            )


def _weight_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and the tensors of node attributes (constants), subgraphs included."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)


def _integer_input(path: Path, value: onnx.ValueInfoProto) -> np.dtype:
    tensor = value.type.tensor_type
    if tensor.elem_type not in _INTEGER_TYPES:
        raise OnnxModelError(
            path,
            f"input {value.name!r} is of type {onnx.TensorProto.DataType.Name(tensor.elem_type)}; token ids "
            "and masks are int64 or int32",
        )
    if len(tensor.shape.dim) != 2:
        raise OnnxModelError(
            path, f"input {value.name!r} has {len(tensor.shape.dim)} dimensions; expected (batch, sequence)"
        )
    return _INTEGER_TYPES[tensor.elem_type]


def _labels(path: Path, value: onnx.ValueInfoProto) -> int:
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 2:
        raise OnnxModelError(
            path,
            f"output {value.name!r} has {len(dims)} dimensions; a reranker's logits are (batch, labels)",
        )
    labels = dims[1]
    if not labels.HasField("dim_value"):
        raise OnnxModelError(
            path,
            f"output {value.name!r} has a dynamic shape (batch, {labels.dim_param or '?'}); a reranker's "
            "logits are (batch, 1) or (batch, 2): export the sequence classifier with its labels fixed",
        )
    if labels.dim_value not in (1, 2):
        raise OnnxModelError(
            path, f"output {value.name!r} has {labels.dim_value} labels; a reranker has 1 or 2"
        )
    return int(labels.dim_value)


def _weight_type(model: onnx.ModelProto) -> str:
    """The element type holding most of the dense layers' weight values (matrices only, embedding tables
    left out: quantizers store those apart, e.g. uint8 beside int8 layers)."""
    tables = {name for node in model.graph.node if node.op_type == "Gather" for name in node.input[:1]}
    counts: Counter[int] = Counter()
    for tensor in model.graph.initializer:
        if len(tensor.dims) >= 2 and tensor.name not in tables:
            counts[tensor.data_type] += int(np.prod(tensor.dims))
    if not counts:
        return "float32"
    data_type = counts.most_common(1)[0][0]
    return _WEIGHT_TYPES.get(data_type, onnx.TensorProto.DataType.Name(data_type).lower())
