"""What a Hugging Face-format folder's config.json and tokenizer files tell the engine, whatever runs the
weights (the torch backend on safetensors, ONNX Runtime or OpenVINO on an ONNX export): the network's
family, its pair template (an LLM reranker's prompt), the longest pair it takes, and whether it reads
token types. One reading for every backend and for the tools that tokenize as the server does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from rerankd.backends.base import ModelLoadError
from rerankd.formats.tokenizer import TokenizerLoadError, load_prompt_tokenizer, load_tokenizer
from rerankd.modeling.causal import CAUSAL_FAMILIES, CausalFamily, Prompt, causal_family
from rerankd.modeling.encoders import ENCODER_FAMILIES, EncoderFamily, encoder_family, reads_token_types

DEBERTA_ARCHITECTURE = "DebertaV2ForSequenceClassification"
DEBERTA_FAMILY = "deberta-v2"
SERVED_ARCHITECTURES = (DEBERTA_ARCHITECTURE, *ENCODER_FAMILIES, *CAUSAL_FAMILIES)
# DeBERTa-v3's position limit where config.json states none (its relative positions cover 512).
DEBERTA_DEFAULT_MAX_LENGTH = 512


@dataclass(frozen=True)
class FolderModel:
    config: dict[str, Any]
    tokenizer: Tokenizer
    family: str  # as `/info` reports it
    max_length: int  # the longest pair the network's positions cover
    token_types: bool  # the network adds a token type embedding that differs between the two segments
    encoder: EncoderFamily | None = None  # one of `transformers`' encoders
    llm: CausalFamily | None = None  # an LLM reranker

    @property
    def prompt(self) -> Prompt | None:
        return None if self.llm is None else self.llm.prompt


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json, as a dict; ModelLoadError naming the folder when it is missing or bad."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ModelLoadError(f"{folder}: config.json is missing") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return config


def read_folder_model(folder: Path, config: dict[str, Any] | None = None) -> FolderModel:
    """The folder's family (by config.json's architecture) and its tokenizer, loaded with that family's
    pair template; ModelLoadError naming the folder for an architecture rerankd does not serve."""
    config = read_config(folder) if config is None else config
    try:
        llm = causal_family(config)
        if llm is not None:
            return FolderModel(
                config,
                load_prompt_tokenizer(folder),
                llm.name,
                int(config["max_position_embeddings"]),
                token_types=False,
                llm=llm,
            )
        encoder = encoder_family(config)
        architectures = config.get("architectures") or [DEBERTA_ARCHITECTURE]
        if encoder is None and architectures[0] != DEBERTA_ARCHITECTURE:
            raise ModelLoadError(
                f"{folder}: config.json's architecture {architectures[0]!r} is not one rerankd serves "
                f"({', '.join(SERVED_ARCHITECTURES)})"
            )
        tokenizer = load_tokenizer(folder, 1 if encoder is None else encoder.middle_separators)
        if encoder is None:
            max_length = int(config.get("max_position_embeddings", DEBERTA_DEFAULT_MAX_LENGTH))
            return FolderModel(config, tokenizer, DEBERTA_FAMILY, max_length, reads_token_types(config))
        return FolderModel(
            config, tokenizer, encoder.name, encoder.max_length(config), reads_token_types(config), encoder
        )
    except TokenizerLoadError as error:
        raise ModelLoadError(f"{folder}: {error}") from error
    except KeyError as error:
        raise ModelLoadError(f"{folder}: the model config lacks the required key {error}") from error
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"{folder}: config.json: {error}") from error
