"""ONNX backend: a reranker exported to ONNX (Mixedbread's `onnx/` files, a team's own export, or
`rerankd export --format onnx`), run by ONNX Runtime (`--backend onnx`: its CPU execution provider, or CUDA's
where onnxruntime-gpu is installed) or by OpenVINO (`--backend openvino`: its CPU plugin).

The graph is checked first (`formats.onnx_graph`), so a graph rerankd cannot feed is refused naming the
file. The tokenizer, the family's pair template and the position limit come from the model folder's
config.json and tokenizer files, read as for every backend (`folder_model`); the engine's batches are padded
to their longest pair and fed as the graph's own integer types. ONNX Runtime runs the graph in the precision
it was exported in, so a lower precision is a variant file (`:onnx:fp16`, `:onnx:int8`), while OpenVINO
takes `--dtype` as its inference precision, and `--dtype auto` keeps its bfloat16 on CPUs with bf16 units
when the model's validation scores hold, as the torch backend does.
"""

from __future__ import annotations

import importlib
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from rerankd.backends import torch_backend
from rerankd.backends.base import BackendInfo, Batch, ModelLoadError, RerankBackend
from rerankd.backends.folder_model import FolderModel, read_folder_model
from rerankd.catalog import UNTRAINED_KEY
from rerankd.formats.onnx_graph import (
    OnnxModelError,
    RerankerGraph,
    inspect_reranker_graph,
    model_folder_of,
)
from rerankd.settings import RuntimeSettings

logger = logging.getLogger(__name__)

ONNX_RUNTIMES = ("onnx", "openvino")
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
# `--dtype` as OpenVINO's inference precision hint (auto starts in float32, like every backend).
OPENVINO_PRECISIONS = {"auto": "f32", "float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def _import(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModelLoadError(
            f"the {extra} backend needs the {module} package: pip install 'rerankd[{extra}]'"
        ) from error


def resolve_device(runtime: str, requested: str) -> str:
    """`cpu`, or `cuda[:N]` for ONNX Runtime where its CUDA execution provider is installed (auto takes it
    there). OpenVINO runs on the CPU."""
    if runtime == "openvino":
        if requested not in ("auto", "cpu"):
            raise ModelLoadError(
                f"--device {requested}: the openvino backend runs on the CPU (use cpu or auto)"
            )
        return "cpu"
    providers = _import("onnxruntime", "onnx").get_available_providers()
    if requested == "auto":
        return "cuda" if CUDA_PROVIDER in providers else "cpu"
    if requested.startswith("cuda") and CUDA_PROVIDER not in providers:
        raise ModelLoadError(
            f"--device {requested}: this onnxruntime has no CUDA execution provider (it has "
            f"{', '.join(providers)}); install onnxruntime-gpu in its place"
        )
    if requested != "cpu" and not requested.startswith("cuda"):
        raise ModelLoadError(f"--device {requested}: supported devices are auto, cpu and cuda")
    return requested


class GraphSession(ABC):
    """One runtime's loaded graph: integer inputs in, logits (batch, labels) out."""

    precision: str  # the dtype the runtime computes in, as /info reports it

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...


class OnnxRuntimeSession(GraphSession):
    """An ONNX Runtime session on the CPU or CUDA execution provider, fed through IO binding, so that on a
    GPU the inputs are copied once and the logits come back in one copy."""

    def __init__(self, graph: RerankerGraph, device: str, threads: int) -> None:
        ort = _import("onnxruntime", "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: its warnings are about constant folding
        cuda = device.startswith("cuda")
        self._device_id = int(device.partition(":")[2] or 0) if cuda else 0
        self._device_type = "cuda" if cuda else "cpu"
        providers: list[Any] = [(CUDA_PROVIDER, {"device_id": self._device_id})] if cuda else []
        try:
            self._session = ort.InferenceSession(
                str(graph.path), options, providers=[*providers, CPU_PROVIDER]
            )
        except Exception as error:  # onnxruntime raises its own exception types, one per failure kind
            raise ModelLoadError(f"{graph.path}: ONNX Runtime could not load the graph: {error}") from error
        if cuda and CUDA_PROVIDER not in self._session.get_providers():
            raise ModelLoadError(
                f"{graph.path}: ONNX Runtime fell back to the CPU (its CUDA provider could not start: "
                "check the CUDA and cuDNN libraries onnxruntime-gpu needs)"
            )
        self._output = graph.output
        self.precision = graph.weight_type

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        binding = self._session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(self._output, self._device_type, self._device_id)
        self._session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0])


class OpenVinoSession(GraphSession):
    """The graph compiled by OpenVINO for the CPU at one inference precision, latency-minded (one request
    at a time, every thread on it)."""

    def __init__(self, graph: RerankerGraph, precision: str, threads: int) -> None:
        openvino = _import("openvino", "openvino")
        self._graph = graph
        self._core = openvino.Core()
        try:
            self._model = self._core.read_model(str(graph.path))
        except Exception as error:  # OpenVINO's RuntimeError subclasses, one per frontend failure
            raise ModelLoadError(f"{graph.path}: OpenVINO could not read the graph: {error}") from error
        self._threads = threads
        self.compile(precision)

    def compile(self, precision: str) -> None:
        hint = OPENVINO_PRECISIONS[precision]
        config = {
            "INFERENCE_PRECISION_HINT": hint,
            "INFERENCE_NUM_THREADS": self._threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        try:
            compiled = self._core.compile_model(self._model, "CPU", config)
        except Exception as error:
            raise ModelLoadError(
                f"{self._graph.path}: OpenVINO could not compile the graph ({hint}): {error}"
            ) from error
        self._request = compiled.create_infer_request()
        self._output = compiled.output(self._graph.output)
        chosen = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # what the plugin took
        self.precision = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(chosen, chosen)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self._request.infer(feeds)[self._output])


class OnnxBackend(RerankBackend):
    """An ONNX graph behind the engine's interface: each batch padded to its longest pair, one pass."""

    def __init__(
        self, runtime: str, graph: RerankerGraph, model: FolderModel, session: GraphSession, device: str
    ) -> None:
        self._graph = graph
        self._session = session
        self._token_types = model.token_types
        pad_id = model.config.get("pad_token_id")
        self._pad_id = 0 if pad_id is None else int(pad_id)
        self.tokenizer = model.tokenizer
        self.info = BackendInfo(
            backend=runtime,
            family=model.family,
            device=device,
            dtype=session.precision,
            max_length=model.max_length,
            untrained=bool(model.config.get(UNTRAINED_KEY, False)),
        )

    def relevance_logits(self, batch: Batch) -> list[float]:
        rows, longest = len(batch), batch.longest
        ids = np.full((rows, longest), self._pad_id, dtype=np.int64)
        mask = np.zeros((rows, longest), dtype=np.int64)
        types = np.zeros((rows, longest), dtype=np.int64)
        for row, pair in enumerate(batch.pairs):
            ids[row, : len(pair)] = pair.ids
            mask[row, : len(pair)] = 1
            if self._token_types:
                types[row, pair.second_segment : len(pair)] = 1
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feeds = {name: arrays[name].astype(dtype, copy=False) for name, dtype in self._graph.inputs.items()}
        logits = self._session.run(feeds).astype(np.float64)
        if logits.shape != (rows, self._graph.labels):
            raise RuntimeError(
                f"{self._graph.path}: the graph gave logits of shape {logits.shape} for {rows} pairs"
            )
        column = logits[:, 0] if self._graph.labels == 1 else logits[:, 1] - logits[:, 0]
        return column.tolist()

    def faster_dtypes(self) -> tuple[tuple[str, ...], ...]:
        """OpenVINO's bf16 on CPUs with bf16 units (AMX, AVX512-BF16), when it computes in float32 now."""
        if (
            isinstance(self._session, OpenVinoSession)
            and self.info.dtype == "float32"
            and torch_backend.cpu_has_bf16_units()
        ):
            return (("bfloat16",),)
        return ()

    def cast(self, dtype: str) -> None:
        if not isinstance(self._session, OpenVinoSession):
            raise NotImplementedError("ONNX Runtime runs a graph in the precision it was exported in")
        self._session.compile(dtype)
        self.info = replace(self.info, dtype=self._session.precision)


def load_onnx_backend(path: Path, settings: RuntimeSettings, runtime: str) -> OnnxBackend:
    """The graph at `path` with its folder's tokenizer, on the runtime named (`onnx` or `openvino`) and the
    settings' resolved device."""
    try:
        graph = inspect_reranker_graph(path)
    except OnnxModelError as error:
        raise ModelLoadError(str(error)) from error
    model = read_folder_model(model_folder_of(path))
    if model.llm is not None:
        raise ModelLoadError(
            f"{path}: {model.family} is an LLM reranker; the {runtime} backend serves classifiers"
        )
    threads = settings.threads or len(os.sched_getaffinity(0))
    session: GraphSession
    if runtime == "openvino":
        if settings.dtype not in OPENVINO_PRECISIONS:
            raise ModelLoadError(
                f"--dtype {settings.dtype}: OpenVINO takes --dtype as its precision hint, one of "
                f"{', '.join(OPENVINO_PRECISIONS)}; for int8 serve a quantized graph on ONNX Runtime "
                "(`rerankd export --format onnx --type int8`, served as <model>:onnx:int8 --backend onnx)"
            )
        session = OpenVinoSession(graph, settings.dtype, threads)
    else:
        if settings.dtype not in ("auto", "float32", graph.weight_type):
            raise ModelLoadError(
                f"--dtype {settings.dtype}: ONNX Runtime runs {path.name} in the precision it was exported "
                f"in ({graph.weight_type}); serve a {settings.dtype} variant of the graph instead (`rerankd "
                "export --format onnx --type f16` writes onnx/model_fp16.onnx, served as <model>:onnx:fp16)"
            )
        session = OnnxRuntimeSession(graph, settings.device, threads)
    if model.config.get(UNTRAINED_KEY):
        logger.warning("%s holds RANDOM, UNTRAINED weights: its scores are meaningless", path)
    logger.info("%s: %s graph, %s weights, on %s", path.name, runtime, graph.weight_type, settings.device)
    return OnnxBackend(runtime, graph, model, session, settings.device)
