"""Pick the backend that can serve what a model path holds, settle where it runs, and load it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rerankd.backends import llamacpp_backend, torch_backend
from rerankd.backends.base import ModelLoadError, RerankBackend
from rerankd.backends.gguf_backend import load_gguf_backend, pick_gguf_file
from rerankd.backends.llamacpp_backend import LLAMACPP_ARCHITECTURES, load_llamacpp_backend
from rerankd.backends.safetensors_backend import load_safetensors_backend
from rerankd.formats.gguf_file import GGUFModelError, gguf_architecture
from rerankd.formats.gguf_layout import ARCHITECTURE as DEBERTA_ARCHITECTURE
from rerankd.formats.safetensors import has_safetensors
from rerankd.settings import RuntimeSettings

BACKENDS = ("torch", "gguf", "llamacpp")


@dataclass(frozen=True)
class BackendPlan:
    """What will serve a model: the backend, the file or folder it reads, and the settings resolved for the
    device it runs on (device defaults filled in), which the backend and the engine both receive."""

    backend: str  # one of BACKENDS
    path: Path
    settings: RuntimeSettings


def plan_backend(path: Path, settings: RuntimeSettings, gguf_variant: str | None = None) -> BackendPlan:
    """The backend the files at `path` call for, or the one `settings.backend` forces.

    A folder with config.json and safetensors goes to the torch backend (unless a GGUF variant is asked
    for); a GGUF (a `.gguf` file, or a folder of `<model>.<TYPE>.gguf` files) by its general.architecture:
    DeBERTa to the GGUF backend (our torch network), what llama.cpp serves with rank pooling to llama.cpp.
    The device `auto` becomes the one that backend would run on.
    """
    if settings.backend not in ("auto", *BACKENDS):
        raise ModelLoadError(f"unknown backend {settings.backend!r} (choose auto, {', '.join(BACKENDS)})")
    gguf_file = _gguf_file(path, gguf_variant)
    if gguf_file is None:
        if path.is_dir() and (path / "config.json").is_file() and has_safetensors(path):
            if settings.backend not in ("auto", "torch"):
                raise ModelLoadError(
                    f"{path}: a safetensors model runs on the torch backend, not {settings.backend}"
                )
            backend, source = "torch", path
        else:
            raise ModelLoadError(
                f"{path}: no model found: expected a folder with config.json, model.safetensors (or sharded "
                "*.safetensors) and tokenizer.json or spm.model; a .gguf file; or a folder of "
                "<model>.<TYPE>.gguf files"
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
    if plan.backend == "llamacpp":
        return load_llamacpp_backend(plan.path, plan.settings)
    if plan.backend == "gguf":
        return load_gguf_backend(plan.path, plan.settings, reference_pairs)
    return load_safetensors_backend(plan.path, plan.settings, reference_pairs)


def _gguf_file(path: Path, gguf_variant: str | None) -> Path | None:
    """The GGUF file `path` names or holds; None for anything else."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not path.is_dir():
        return None
    if gguf_variant is None and (path / "config.json").is_file() and has_safetensors(path):
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
