"""A Hugging Face-format folder (config.json, safetensors weights, tokenizer), served by the network that
config.json's architecture names: DeBERTa-v2/v3 by the project's own, other encoders and the LLM rerankers
by `transformers`'."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rerankd.backends.base import ModelLoadError
from rerankd.backends.causal_backend import build_causal_backend
from rerankd.backends.deberta_backend import build_deberta_backend
from rerankd.backends.encoder_backend import build_encoder_backend
from rerankd.backends.folder_model import read_config, read_folder_model
from rerankd.backends.torch_backend import TorchBackend
from rerankd.formats.safetensors import SafetensorsCheckpoint, SafetensorsCheckpointError
from rerankd.modeling.config import UnsupportedModelError, check_config_sizes
from rerankd.settings import RuntimeSettings


def load_safetensors_backend(
    folder: Path, settings: RuntimeSettings, reference_pairs: Sequence[tuple[str, str]] = ()
) -> TorchBackend:
    """The folder's model on the torch backend (`reference_pairs`: see `registry.load_backend`). A config
    whose sizes the checkpoint cannot back is refused first, before any family allocates from it."""
    raw_config = read_config(folder)
    try:
        reader = SafetensorsCheckpoint(folder)
        check_config_sizes(raw_config, reader.shapes().values())
    except FileNotFoundError as error:
        raise ModelLoadError(f"{folder}: {error.filename} is missing") from error
    except (SafetensorsCheckpointError, UnsupportedModelError) as error:
        raise ModelLoadError(f"{folder}: {error}") from error
    model = read_folder_model(folder, raw_config)
    if model.llm is not None:
        return build_causal_backend(folder, model, model.llm, settings)
    if model.encoder is not None:
        return build_encoder_backend(folder, model, model.encoder, settings)
    return build_deberta_backend(
        "torch", raw_config, reader, model.tokenizer, settings, folder, reference_pairs
    )
