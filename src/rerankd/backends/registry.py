"""Pick and load the backend that can serve what a model path holds."""

from __future__ import annotations

from pathlib import Path

from rerankd.backends.base import BackendOptions, ModelLoadError, RerankBackend
from rerankd.backends.gguf_backend import load_gguf_backend, pick_gguf_file
from rerankd.backends.llamacpp_backend import LLAMACPP_ARCHITECTURES, load_llamacpp_backend
from rerankd.backends.torch_backend import load_safetensors_backend
from rerankd.formats.gguf_layout import ARCHITECTURE as DEBERTA_ARCHITECTURE
from rerankd.formats.gguf_reader import GGUFModelError, gguf_architecture
from rerankd.formats.safetensors import has_safetensors

BACKENDS = ("torch", "gguf", "llamacpp")


def load_backend(path: Path, options: BackendOptions, gguf_variant: str | None = None) -> RerankBackend:
    """Load the model at `path` with the backend its files call for, or the one `options.backend` forces.

    A folder with config.json and safetensors goes to the torch backend (unless a GGUF variant is asked
    for); a GGUF (a `.gguf` file, or a folder of `<model>.<TYPE>.gguf` files) by its general.architecture:
    DeBERTa to the GGUF backend (our torch network), what llama.cpp serves with rank pooling to llama.cpp.
    """
    if options.backend not in ("auto", *BACKENDS):
        raise ModelLoadError(f"unknown backend {options.backend!r} (choose auto, {', '.join(BACKENDS)})")
    gguf_file = _gguf_file(path, gguf_variant)
    if gguf_file is None:
        if path.is_dir() and (path / "config.json").is_file() and has_safetensors(path):
            if options.backend in ("auto", "torch"):
                return load_safetensors_backend(path, options)
            raise ModelLoadError(
                f"{path}: a safetensors model runs on the torch backend, not {options.backend}"
            )
        raise ModelLoadError(
            f"{path}: no model found: expected a folder with config.json, model.safetensors (or sharded "
            "*.safetensors) and tokenizer.json or spm.model; a .gguf file; or a folder of "
            "<model>.<TYPE>.gguf files"
        )
    backend = options.backend if options.backend != "auto" else _gguf_backend(gguf_file)
    if backend == "llamacpp":
        return load_llamacpp_backend(gguf_file, options)
    return load_gguf_backend(gguf_file, options)


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
