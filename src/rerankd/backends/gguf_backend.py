"""GGUF backend: Antfly-layout DeBERTa GGUF files (Q8_0, Q4_K, F16, F32) on the project's torch network.

llama.cpp has no DeBERTa, so these files are read with the `gguf` package, each tensor dequantized once,
straight into the compute dtype, and served by the same network and scheduler as safetensors checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from rerankd.backends.base import ModelLoadError
from rerankd.backends.deberta_backend import DebertaBackend, build_deberta_backend
from rerankd.formats.gguf_file import GGUFModelError, find_gguf_variants
from rerankd.formats.gguf_reader import open_deberta_gguf
from rerankd.modeling.config import UnsupportedModelError, check_config_sizes
from rerankd.settings import RuntimeSettings

logger = logging.getLogger(__name__)

# Without a variant selector, a folder of several variants serves the most faithful one.
VARIANT_PREFERENCE = ("F32", "F16", "Q8_0", "Q4_K")


def pick_gguf_file(folder: Path, variant: str | None) -> Path | None:
    """The folder's `<model>.<variant>.gguf`, or its most faithful variant; None when it holds none."""
    try:
        variants = find_gguf_variants(folder)
    except GGUFModelError as error:
        raise ModelLoadError(str(error)) from error
    if variant is not None:
        if variant not in variants:
            raise ModelLoadError(
                f"{folder}: no {variant} GGUF file (found: {', '.join(sorted(variants)) or 'none'})"
            )
        return variants[variant]
    for preferred in VARIANT_PREFERENCE:
        if preferred in variants:
            return variants[preferred]
    return None


def load_gguf_backend(
    path: Path, settings: RuntimeSettings, reference_pairs: Sequence[tuple[str, str]] = ()
) -> DebertaBackend:
    try:
        model = open_deberta_gguf(path)
        check_config_sizes(model.config, model.tensors.shapes().values())
    except GGUFModelError as error:
        raise ModelLoadError(str(error)) from error
    except UnsupportedModelError as error:  # a sidecar config.json's sizes, or the metadata's
        raise ModelLoadError(f"{path}: {error}") from error
    logger.info("%s: %s GGUF, tensor types %s", path.name, model.file_type, model.type_summary())
    return build_deberta_backend(
        "gguf", model.config, model.tensors, model.tokenizer(), settings, path, reference_pairs
    )
