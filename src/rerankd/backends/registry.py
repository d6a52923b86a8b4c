"""Pick and load the backend that can serve what a model path holds."""

from __future__ import annotations

from pathlib import Path

from rerankd.backends.base import BackendOptions, ModelLoadError, RerankBackend
from rerankd.backends.gguf_backend import load_gguf_backend, pick_gguf_file
from rerankd.backends.torch_backend import load_safetensors_backend
from rerankd.formats.safetensors import has_safetensors


def load_backend(path: Path, options: BackendOptions, gguf_variant: str | None = None) -> RerankBackend:
    """Load the model at `path` with the backend its files call for.

    A `.gguf` file goes to the GGUF backend; a folder with config.json and safetensors to the torch backend
    (unless a GGUF variant is asked for); a folder of `<model>.<TYPE>.gguf` files to the GGUF backend.
    """
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf_backend(path, options)
    if path.is_dir():
        if gguf_variant is None and (path / "config.json").is_file() and has_safetensors(path):
            return load_safetensors_backend(path, options)
        gguf_file = pick_gguf_file(path, gguf_variant)
        if gguf_file is not None:
            return load_gguf_backend(gguf_file, options)
    raise ModelLoadError(
        f"{path}: no model found: expected a folder with config.json, model.safetensors (or sharded "
        "*.safetensors) and tokenizer.json or spm.model; a .gguf file; or a folder of "
        "<model>.<TYPE>.gguf files"
    )
