"""Open a DeBERTa reranker GGUF file (Antfly Inference layout) and validate it: config, tensors and tokenizer.

Everything that can be wrong with a file is found by `open_deberta_gguf`, before any weight is
loaded: unreadable or truncated files, another architecture, missing metadata, missing or misshaped
tensors, tensor types we cannot dequantize, a vocabulary that cannot give a tokenizer. Each becomes
one GGUFModelError naming the file. Weights are then read one tensor at a time from the memory map.

A config.json next to the file (Antfly's model folders carry one) is merged over what the metadata
implies, since the metadata stores only part of the config.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, GGUFReader, Keys, ReaderTensor
from tokenizers import Tokenizer

from rerankd.formats.gguf_file import (
    GGUFModelError,
    GGUFTensors,
    metadata_integer,
    metadata_number,
    metadata_string,
    read_gguf,
    torch_shape,
)
from rerankd.formats.gguf_layout import (
    ARCHITECTURE,
    CONFIG_KEYS,
    LAYER_NORM_EPSILON_KEY,
    QUANTIZED_TYPES,
    config_from_metadata,
    expected_tensor_shapes,
)
from rerankd.formats.gguf_unigram import deberta_tokenizer
from rerankd.modeling.config import DebertaConfig, UnsupportedModelError

SIDECAR_CONFIG = "config.json"
SUPPORTED_TENSOR_TYPES = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_K,
)


@dataclass(frozen=True)
class DebertaGGUF:
    """An opened, validated DeBERTa GGUF file."""

    path: Path
    # An HF config.json dict (v3 defaults for what the file omits, a sidecar config.json merged over it).
    config: dict[str, Any]
    tensors: GGUFTensors
    # The parsed file, for reporting its metadata.
    reader: GGUFReader
    _tokenizer: Tokenizer

    def tokenizer(self) -> Tokenizer:
        """The sidecar tokenizer.json, else the one rebuilt from tokenizer.ggml.*; built once, at open."""
        return self._tokenizer

    @property
    def tensor_types(self) -> dict[str, str]:
        return self.tensors.types()

    def type_summary(self) -> dict[str, int]:
        """Number of tensors stored in each type, e.g. {'Q8_0': 76, 'F16': 126}."""
        return dict(Counter(self.tensor_types.values()).most_common())

    @property
    def file_type(self) -> str:
        """What the file is called by: its quantized type if it has one, else its matrices' float type."""
        types = self.tensor_types
        quantized = [kind for kind in types.values() if kind in {qtype.name for qtype in QUANTIZED_TYPES}]
        if quantized:
            return Counter(quantized).most_common(1)[0][0]
        matrices = [types[name] for name, shape in self.tensors.shapes().items() if len(shape) >= 2]
        return Counter(matrices).most_common(1)[0][0]


def open_deberta_gguf(path: Path) -> DebertaGGUF:
    """Open and validate `path`; raises GGUFModelError for anything that would fail or misbehave later."""
    reader = read_gguf(path)
    architecture = metadata_string(path, reader, Keys.General.ARCHITECTURE)
    if architecture != ARCHITECTURE:
        raise GGUFModelError(
            path,
            f"general.architecture is {architecture!r}; rerankd reads {ARCHITECTURE!r} reranker files "
            "(other architectures need the llama.cpp backend)",
        )
    config = _config(path, reader)
    try:
        parsed = DebertaConfig.from_dict(config)
    except (UnsupportedModelError, KeyError, TypeError, ValueError) as error:
        raise GGUFModelError(path, f"the model config is not usable: {error}") from error
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    _check_tensors(path, parsed, tensors)
    tokenizer = deberta_tokenizer(path, reader)
    if tokenizer.get_vocab_size() > parsed.vocab_size:
        raise GGUFModelError(
            path,
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the word embeddings only "
            f"{parsed.vocab_size} rows",
        )
    return DebertaGGUF(
        path=path,
        config=config,
        tensors=GGUFTensors(tensors, getattr(reader, "file_map", None)),
        reader=reader,
        _tokenizer=tokenizer,
    )


def _config(path: Path, reader: GGUFReader) -> dict[str, Any]:
    """The HF config the metadata implies, with the sidecar config.json (if any) merged over it."""
    values: dict[str, int | float] = {
        key: (
            metadata_number(path, reader, key)
            if key == LAYER_NORM_EPSILON_KEY
            else metadata_integer(path, reader, key)
        )
        for key in CONFIG_KEYS
    }
    config = config_from_metadata(values, metadata_integer(path, reader, Keys.Tokenizer.PAD_ID, default=0))
    sidecar = path.parent / SIDECAR_CONFIG
    if not sidecar.is_file():
        return config
    try:
        overrides = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GGUFModelError(sidecar, f"not readable JSON ({error})") from error
    if not isinstance(overrides, dict):
        raise GGUFModelError(sidecar, f"holds a {type(overrides).__name__}, expected a JSON object")
    if "num_labels" in overrides or "id2label" in overrides:
        # The sidecar's own label set replaces the one derived from label_count, not mixes with it.
        config.pop("id2label")
        config.pop("label2id")
    return config | overrides


def _check_tensors(path: Path, config: DebertaConfig, tensors: Mapping[str, ReaderTensor]) -> None:
    """Every tensor the config needs is there, in a type we dequantize, in the config's shape."""
    expected = expected_tensor_shapes(config)
    missing = [name for name in expected if name not in tensors]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise GGUFModelError(path, f"{len(missing)} tensors the config needs are missing: {shown}")
    for name, shape in expected.items():
        tensor = tensors[name]
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(kind.name for kind in SUPPORTED_TENSOR_TYPES)
            raise GGUFModelError(
                path, f"tensor {name!r} is stored as {tensor.tensor_type.name}; supported: {supported}"
            )
        if torch_shape(tensor) != shape:
            raise GGUFModelError(
                path,
                f"tensor {name!r} has ggml shape {list(reversed(torch_shape(tensor)))}, the config needs "
                f"{list(reversed(shape))}",
            )
