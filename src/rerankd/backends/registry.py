"""Pick the backend that can serve what a model path holds, settle where it runs, and load it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rerankd.backends import llamacpp_backend, onnx_backend, torch_backend
from rerankd.backends.base import ModelLoadError, RerankBackend
from rerankd.backends.gguf_backend import load_gguf_backend, pick_gguf_file
from rerankd.backends.llamacpp_backend import LLAMACPP_ARCHITECTURES, load_llamacpp_backend
from rerankd.backends.onnx_backend import ONNX_RUNTIMES, load_onnx_backend
from rerankd.backends.safetensors_backend import load_safetensors_backend
from rerankd.formats.gguf_file import GGUFModelError, gguf_architecture
from rerankd.formats.gguf_layout import ARCHITECTURE as DEBERTA_ARCHITECTURE
from rerankd.formats.onnx_graph import find_onnx_file, onnx_variants
from rerankd.formats.safetensors import has_safetensors
from rerankd.settings import RuntimeSettings

BACKENDS = ("torch", "gguf", "llamacpp", *ONNX_RUNTIMES)
# Without a variant selector, a folder of ONNX graphs alone serves the most faithful one it has.
ONNX_VARIANT_PREFERENCE = ("fp32", "fp16", "int8", "uint8", "quantized")


@dataclass(frozen=True)
class FileVariant:
    """Which file of a folder holding several a selector asks for: `repo:gguf:Q8_0` is a GGUF variant,
    `repo:onnx` the float32 ONNX graph (variant None), `repo:onnx:int8` its int8 one."""

    format: Literal["gguf", "onnx"]
    name: str | None


@dataclass(frozen=True)
class BackendPlan:
    """What will serve a model: the backend, the file or folder it reads, and the settings resolved for the
    device it runs on (device defaults filled in), which the backend and the engine both receive."""

    backend: str  # one of BACKENDS
    path: Path
    settings: RuntimeSettings


def plan_backend(path: Path, settings: RuntimeSettings, variant: FileVariant | None = None) -> BackendPlan:
    """The backend the files at `path` call for, or the one `settings.backend` forces.

    A folder with config.json and safetensors goes to the torch backend (unless a GGUF or ONNX variant is
    asked for); a GGUF (a `.gguf` file, or a folder of `<model>.<TYPE>.gguf` files) by its
    general.architecture: DeBERTa to the GGUF backend (our torch network), what llama.cpp serves with rank
    pooling to llama.cpp; an ONNX graph (a `.onnx` file, a folder's `onnx/model[_variant].onnx` when asked
    for or when the folder has no other weights) to ONNX Runtime, or OpenVINO when `--backend openvino`.
    The device `auto` becomes the one that backend would run on.
    """
    if settings.backend not in ("auto", *BACKENDS):
        raise ModelLoadError(f"unknown backend {settings.backend!r} (choose auto, {', '.join(BACKENDS)})")
    graph = _onnx_file(path, variant, settings.backend)
    if graph is not None:
        runtime = "onnx" if settings.backend == "auto" else settings.backend
        if runtime not in ONNX_RUNTIMES:
            raise ModelLoadError(
                f"{graph}: an ONNX graph runs on the onnx or openvino backend, not {runtime}"
            )
        device = onnx_backend.resolve_device(runtime, settings.device)
        return BackendPlan(runtime, graph, settings.for_device(device))
    if settings.backend in ONNX_RUNTIMES:
        raise ModelLoadError(f"{path}: the {settings.backend} backend serves ONNX graphs, and this has none")
    gguf_variant = variant.name if variant is not None else None
    gguf_file = _gguf_file(path, gguf_variant)
    if gguf_file is None:
        if path.is_dir() and _safetensors_model(path):
            if settings.backend not in ("auto", "torch"):
                raise ModelLoadError(
                    f"{path}: a safetensors model runs on the torch backend, not {settings.backend}"
                )
            backend, source = "torch", path
        else:
            raise ModelLoadError(
                f"{path}: no model found: expected a folder with config.json, model.safetensors (or sharded "
                "*.safetensors) and tokenizer.json or spm.model; a .gguf file; a folder of "
                "<model>.<TYPE>.gguf files; or an ONNX export (onnx/model.onnx beside config.json and the "
                "tokenizer, or a .onnx file)"
            )
    else:
        backend = settings.backend if settings.backend != "auto" else _gguf_backend(gguf_file)
        source = gguf_file
    if backend == "llamacpp":
        device = llamacpp_backend.resolve_device(settings.device, source)
    else:
        device = str(torch_backend.resolve_device(settings.device))
    return BackendPlan(backend, source, settings.for_device(device))


def load_backend(plan: BackendPlan, reference_pairs: tuple[tuple[str, str], ...] = ()) -> RerankBackend:
    """Load the planned backend. `reference_pairs`: the (query, document) pairs `--dtype auto` scores in
    float32 before it keeps a faster dtype; given them, a backend may load its word-embedding table straight
    in the faster dtype beside float32 copies of their rows, so the float32 model is never whole in memory."""
    if plan.backend in ONNX_RUNTIMES:
        return load_onnx_backend(plan.path, plan.settings, plan.backend)
    if plan.backend == "llamacpp":
        return load_llamacpp_backend(plan.path, plan.settings)
    if plan.backend == "gguf":
        return load_gguf_backend(plan.path, plan.settings, reference_pairs)
    return load_safetensors_backend(plan.path, plan.settings, reference_pairs)


def _onnx_file(path: Path, variant: FileVariant | None, backend: str) -> Path | None:
    """The ONNX graph `path` names or holds, if that is what serves: a `.onnx` file; the variant an `:onnx`
    selector asks for; a folder's graph when an ONNX runtime is asked for or when it has no other weights."""
    if path.is_file():
        return path if path.suffix == ".onnx" else None
    if not path.is_dir():
        return None
    asked = variant is not None and variant.format == "onnx"
    if asked or backend in ONNX_RUNTIMES:
        name = variant.name if asked and variant is not None else None
        graph = find_onnx_file(path, name)
        if graph is None:
            found = ", ".join(sorted(onnx_variants(path))) or "none"
            raise ModelLoadError(
                f"{path}: no ONNX graph {'of variant ' + name if name else 'model.onnx'} in onnx/ or at the "
                f"folder's root (variants found: {found})"
            )
        return graph
    if variant is not None or _safetensors_model(path) or any(path.glob("*.gguf")):
        return None  # a GGUF variant asked for, or weights the other backends serve
    variants = onnx_variants(path)
    return next((variants[name] for name in ONNX_VARIANT_PREFERENCE if name in variants), None)


def _safetensors_model(folder: Path) -> bool:
    """A Hugging Face-format folder the torch backend serves: config.json beside safetensors weights."""
    return (folder / "config.json").is_file() and has_safetensors(folder)


def _gguf_file(path: Path, gguf_variant: str | None) -> Path | None:
    """The GGUF file `path` names or holds; None for anything else."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not path.is_dir():
        return None
    if gguf_variant is None and _safetensors_model(path):
        return None
    return pick_gguf_file(path, gguf_variant)


def _gguf_backend(path: Path) -> str:
    try:
        architecture = gguf_architecture(path)
    except GGUFModelError as error:
        raise ModelLoadError(str(error)) from error
    if architecture == DEBERTA_ARCHITECTURE:
        return "gguf"
    if architecture in LLAMACPP_ARCHITECTURES:
        return "llamacpp"
    raise ModelLoadError(
        f"{path}: no backend serves general.architecture {architecture!r}: the gguf backend serves "
        f"{DEBERTA_ARCHITECTURE!r} and the llamacpp backend {', '.join(map(repr, LLAMACPP_ARCHITECTURES))}"
    )
