"""A Hugging Face-format folder (config.json, safetensors weights, tokenizer), served by the network that
config.json's architecture names: DeBERTa-v2/v3 by the project's own, other encoders and the LLM rerankers
by `transformers`'."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rerankd.backends.base import ModelLoadError
from rerankd.backends.causal_backend import build_causal_backend
from rerankd.backends.deberta_backend import build_deberta_backend
from rerankd.backends.encoder_backend import build_encoder_backend
from rerankd.backends.torch_backend import TorchBackend
from rerankd.formats.safetensors import SafetensorsCheckpoint, SafetensorsCheckpointError
from rerankd.formats.tokenizer import TokenizerLoadError, load_prompt_tokenizer, load_tokenizer
from rerankd.modeling.causal import CAUSAL_FAMILIES, causal_family
from rerankd.modeling.config import UnsupportedModelError, check_config_sizes
from rerankd.modeling.encoders import ENCODER_FAMILIES, encoder_family
from rerankd.settings import RuntimeSettings

DEBERTA_ARCHITECTURE = "DebertaV2ForSequenceClassification"
SERVED_ARCHITECTURES = (DEBERTA_ARCHITECTURE, *ENCODER_FAMILIES, *CAUSAL_FAMILIES)


def load_safetensors_backend(
    folder: Path, settings: RuntimeSettings, reference_pairs: Sequence[tuple[str, str]] = ()
) -> TorchBackend:
    """The folder's model on the torch backend (`reference_pairs`: see `registry.load_backend`). A config
    whose sizes the checkpoint cannot back is refused first, before any family allocates from it."""
    try:
        raw_config = json.loads((folder / "config.json").read_text())
        reader = SafetensorsCheckpoint(folder)
        check_config_sizes(raw_config, reader.shapes().values())
        architectures = raw_config.get("architectures") or [DEBERTA_ARCHITECTURE]
        llm = causal_family(raw_config)
        if llm is not None:
            return build_causal_backend(folder, raw_config, llm, load_prompt_tokenizer(folder), settings)
        family = encoder_family(raw_config)
        if family is None and architectures[0] != DEBERTA_ARCHITECTURE:
            raise ModelLoadError(
                f"{folder}: config.json's architecture {architectures[0]!r} is not one rerankd serves "
                f"({', '.join(SERVED_ARCHITECTURES)})"
            )
        middle_separators = 1 if family is None else family.middle_separators
        tokenizer = load_tokenizer(folder, middle_separators)
        if family is not None:
            return build_encoder_backend(folder, raw_config, family, tokenizer, settings)
    except FileNotFoundError as error:
        raise ModelLoadError(f"{folder}: {error.filename} is missing") from error
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{folder / 'config.json'}: not valid JSON ({error})") from error
    except (SafetensorsCheckpointError, TokenizerLoadError, UnsupportedModelError) as error:
        raise ModelLoadError(f"{folder}: {error}") from error
    return build_deberta_backend("torch", raw_config, reader, tokenizer, settings, folder, reference_pairs)
