"""Pick and load the backend that can serve what a model folder holds."""

from __future__ import annotations

from pathlib import Path

from rerankd.backends.base import BackendOptions, ModelLoadError, RerankBackend
from rerankd.backends.torch_backend import load_safetensors_backend
from rerankd.formats.safetensors import has_safetensors


def load_backend(path: Path, options: BackendOptions) -> RerankBackend:
    """Load the model at `path` with the backend its files call for."""
    if path.is_dir() and (path / "config.json").is_file() and has_safetensors(path):
        return load_safetensors_backend(path, options)
    raise ModelLoadError(
        f"{path}: no model found: expected a folder with config.json, model.safetensors (or sharded "
        "*.safetensors) and tokenizer.json or spm.model"
    )
