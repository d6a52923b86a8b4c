"""Open a DeBERTa reranker GGUF file (Antfly Inference layout): config, tensors and tokenizer.

Everything that can be wrong with a file is found by `open_deberta_gguf`, before any weight is
loaded: unreadable or truncated files, another architecture, missing metadata, missing or misshaped
tensors, tensor types we cannot dequantize, a vocabulary that cannot give a tokenizer. Each becomes
one GGUFModelError naming the file. Weights are then read one tensor at a time from the memory map.

A config.json or tokenizer.json next to the file (Antfly's model folders carry both) is preferred to
what the metadata implies, since the metadata stores only part of the config and the tokenizer's
normalization is exact only with SentencePiece's precompiled table, which Antfly's files lack.

Any GGUF file's architecture (which picks its backend) and metadata are read here too, for the registry
and the llama.cpp backend: gguf's GGUFReader parses arrays one element at a time, so a 128,001-token
vocabulary makes a plain open take 8-12 s on the development machine.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, Keys, ReaderTensor, TokenType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, normalizers

from rerankd.formats.gguf_layout import (
    ARCHITECTURE,
    CONFIG_KEYS,
    LAYER_NORM_EPSILON_KEY,
    PRECOMPILED_CHARSMAP_KEY,
    QUANTIZED_TYPES,
    config_from_metadata,
    expected_tensor_shapes,
    parse_variant_file_name,
)
from rerankd.formats.sentencepiece import pair_template, unigram_tokenizer
from rerankd.formats.tokenizer import TOKENIZER_JSON, TokenizerLoadError, load_tokenizer
from rerankd.modeling.config import DebertaConfig, UnsupportedModelError

SIDECAR_CONFIG = "config.json"
# Enough of a file's start for its header and a first key holding the architecture.
LEADING_BYTES = 256
# The header (magic, version, tensor count, key count) and the first key's length; a value's type and, for a
# string, its length.
_HEADER = struct.Struct("<4sIQQQ")
_STRING_VALUE = struct.Struct("<IQ")
SUPPORTED_TENSOR_TYPES = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_K,
)
# With tokenizer.ggml.tokens, scores and token_type, what a tokenizer is rebuilt from.
SPECIAL_ID_KEYS = (Keys.Tokenizer.BOS_ID, Keys.Tokenizer.EOS_ID, Keys.Tokenizer.UNK_ID)
# What SentencePiece's nmt_nfkc table does besides NFKC, found by comparing DeBERTa-v3's table with
# NFKC on every code point: it deletes these control characters...
NMT_DELETED = "[\u0001-\u0008\u000b\u000e-\u001f\u007f\u008f\u009f]"
# ...and turns these separators, invisible marks and U+2581 (the Metaspace marker itself) into spaces.
NMT_SPACES = "[\t\n\u000c\r\u1680\u200b-\u200f\u2028\u2029\u2581\ufeff\ufffd]"


class GGUFModelError(ValueError):
    """A GGUF file that cannot be served; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class _MappedGGUFReader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map instead of the np.memmap itself.

    GGUFReader parses array metadata one element at a time, and slicing an np.memmap costs several
    times what slicing an ndarray does: a 128,001-token vocabulary takes 10-15 s to open through the
    memmap and 3-5 s through the view. The view still reads the file lazily through the same map.
    """

    @property
    def data(self) -> np.ndarray:
        return self._mapped

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._mapped = value.view(np.ndarray)
        self.file_map: mmap.mmap | None = value.base if isinstance(value.base, mmap.mmap) else None


class GGUFTensors:
    """A `TensorReader` over the file's tensors, by GGUF name, in torch orientation (ggml's reversed).

    F32, F16 and BF16 come back in their stored dtype, Q8_0 and Q4_K dequantized to float32.
    """

    def __init__(self, tensors: Mapping[str, ReaderTensor], file_map: mmap.mmap | None = None) -> None:
        self._tensors = dict(tensors)
        self._file_map = file_map

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def read(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        shape = _torch_shape(tensor)
        if tensor.tensor_type == GGMLQuantizationType.BF16:
            # Copied out of the read-only map; bfloat16 has no numpy dtype, so its bits go through int16.
            values = torch.from_numpy(np.array(tensor.data).view(np.int16)).view(torch.bfloat16)
        elif tensor.tensor_type in QUANTIZED_TYPES:
            values = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type))
        else:
            values = torch.from_numpy(np.array(tensor.data))
        self._release(tensor)
        return values.reshape(shape)

    def _release(self, tensor: ReaderTensor) -> None:
        """Drop the tensor's pages of the memory map once copied out: mapped pages stay resident (and count
        in RSS) until unmapped, so without this a load peaks at the whole file plus the converted weights."""
        if self._file_map is None:
            return
        start = tensor.data_offset - tensor.data_offset % mmap.PAGESIZE
        self._file_map.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)

    def types(self) -> dict[str, str]:
        """Stored type of each tensor, e.g. {'classifier.weight': 'Q8_0'}."""
        return {name: tensor.tensor_type.name for name, tensor in self._tensors.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Torch-order shape of each tensor."""
        return {name: _torch_shape(tensor) for name, tensor in self._tensors.items()}


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
    architecture = _string(path, reader, Keys.General.ARCHITECTURE)
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
    tokenizer = _tokenizer(path, reader)
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


def find_gguf_variants(folder: Path) -> dict[str, Path]:
    """The folder's `<model>.<TYPE>.gguf` files keyed by TYPE (Q8_0, Q4_K, F16, F32)."""
    variants: dict[str, Path] = {}
    for candidate in sorted(folder.glob("*.gguf")):
        parsed = parse_variant_file_name(candidate.name)
        if parsed is None:
            continue
        file_type = parsed[1]
        if file_type in variants:
            raise GGUFModelError(
                candidate, f"{folder} already has a {file_type} variant, {variants[file_type].name}"
            )
        variants[file_type] = candidate
    return variants


def tokenizer_from_vocabulary(
    tokens: list[str],
    scores: list[float],
    token_types: list[int],
    bos_id: int,
    eos_id: int,
    unknown_id: int,
    precompiled_charsmap: bytes | None = None,
) -> Tokenizer:
    """A DeBERTa-v3 tokenizer from GGUF vocabulary metadata: unigram pieces and scores, control and
    unknown tokens as special tokens, `[CLS] A [SEP] B [SEP]` pairs.

    With the precompiled charsmap the normalizer is SentencePiece's own; without it NFKC plus the
    nmt_nfkc deletions and space mappings, which agrees with it on every single code point but
    U+FF5E and U+1F23B, though not on some sequences (conjoining Hangul jamo, halfwidth kana with
    sound marks, some stacked combining marks), which NFKC composes and the table does not.
    """
    character_steps: list[normalizers.Normalizer] = (
        [normalizers.Precompiled(precompiled_charsmap)]
        if precompiled_charsmap
        else [
            normalizers.Replace(Regex(NMT_DELETED), ""),
            normalizers.Replace(Regex(NMT_SPACES), " "),
            normalizers.NFKC(),
        ]
    )
    tokenizer = unigram_tokenizer(list(zip(tokens, scores, strict=True)), unknown_id, character_steps)
    tokenizer.add_special_tokens(
        [
            # DeBERTa-v3 marks [UNK] normalized, so "[UNK]" typed in text still matches it.
            AddedToken(tokens[index], normalized=kind == TokenType.UNKNOWN, special=True)
            for index, kind in enumerate(token_types)
            if kind in (TokenType.CONTROL, TokenType.UNKNOWN)
        ]
    )
    tokenizer.post_processor = pair_template(tokens[bos_id], bos_id, tokens[eos_id], eos_id)
    return tokenizer


def gguf_architecture(path: Path) -> str:
    """`general.architecture`, which decides the backend that then reads the file. gguf's writer (which
    llama.cpp's converters use) and Antfly's exporter store it as the first key, so it is read from the file's
    first bytes; parsing the whole file first would cost 3 s for a DeBERTa-v3 vocabulary. Any other file is
    parsed."""
    try:
        with path.open("rb") as file:
            head = file.read(LEADING_BYTES)
    except OSError:
        head = b""  # read_gguf names the problem
    leading = _leading_architecture(head)
    if leading is not None:
        return leading
    return _string(path, read_gguf(path), Keys.General.ARCHITECTURE)


def _leading_architecture(head: bytes) -> str | None:
    """The architecture when a little-endian GGUF v2/v3 file's first key holds it; None for anything else."""
    try:
        magic, version, _tensors, _keys, key_length = _HEADER.unpack_from(head)
        if magic != b"GGUF" or version not in (2, 3):
            return None
        key_end = _HEADER.size + key_length
        if key_end + _STRING_VALUE.size > len(head):
            return None
        value_type, value_length = _STRING_VALUE.unpack_from(head, key_end)
        key = head[_HEADER.size : key_end]
        if key != Keys.General.ARCHITECTURE.encode() or value_type != GGUFValueType.STRING:
            return None
        value = head[key_end + _STRING_VALUE.size : key_end + _STRING_VALUE.size + value_length]
        return value.decode() if len(value) == value_length else None
    except (struct.error, UnicodeDecodeError):
        return None


def read_gguf(path: Path) -> GGUFReader:
    """The file's metadata and tensor index, through the fast reader; GGUFModelError when unreadable."""
    if not path.is_file():
        raise GGUFModelError(path, "is not a file" if path.exists() else "no such file")
    try:
        reader = _MappedGGUFReader(path)
    # GGUFReader reports bad magic, versions, types, duplicate keys and short reads as ValueError,
    # KeyError, IndexError, OverflowError or numpy errors (a truncated file fails to reshape its last
    # tensors): any of them means an unreadable file.
    except Exception as error:
        raise GGUFModelError(path, f"not a readable GGUF file ({type(error).__name__}: {error})") from error
    return reader


def _value(path: Path, reader: GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        raise GGUFModelError(path, f"required metadata key {key!r} is missing")
    try:
        return field.contents()
    except UnicodeDecodeError as error:
        raise GGUFModelError(path, f"metadata {key!r} holds a string that is not UTF-8 ({error})") from error


def _string(path: Path, reader: GGUFReader, key: str) -> str:
    value = _value(path, reader, key)
    if not isinstance(value, str):
        raise GGUFModelError(path, f"metadata {key!r} is {value!r}, expected a string")
    return value


def _integer(path: Path, reader: GGUFReader, key: str) -> int:
    value = _value(path, reader, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFModelError(path, f"metadata {key!r} is {value!r}, expected an integer")
    return value


def _number(path: Path, reader: GGUFReader, key: str) -> float:
    value = _value(path, reader, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GGUFModelError(path, f"metadata {key!r} is {value!r}, expected a number")
    return float(value)


def _array(path: Path, reader: GGUFReader, key: str, item_type: type) -> list[Any]:
    value = _value(path, reader, key)
    if not isinstance(value, list) or not all(isinstance(item, item_type) for item in value):
        raise GGUFModelError(path, f"metadata {key!r} is not an array of {item_type.__name__}")
    return value


def _config(path: Path, reader: GGUFReader) -> dict[str, Any]:
    values: dict[str, int | float] = {
        key: _number(path, reader, key) if key == LAYER_NORM_EPSILON_KEY else _integer(path, reader, key)
        for key in CONFIG_KEYS
    }
    padding = reader.get_field(Keys.Tokenizer.PAD_ID)
    config = config_from_metadata(values, _integer(path, reader, Keys.Tokenizer.PAD_ID) if padding else 0)
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
        if _torch_shape(tensor) != shape:
            raise GGUFModelError(
                path,
                f"tensor {name!r} has ggml shape {list(reversed(_torch_shape(tensor)))}, the config needs "
                f"{list(reversed(shape))}",
            )


def _tokenizer(path: Path, reader: GGUFReader) -> Tokenizer:
    if (path.parent / TOKENIZER_JSON).is_file():
        try:
            return load_tokenizer(path.parent)
        except TokenizerLoadError as error:
            raise GGUFModelError(path, f"the tokenizer next to it is unusable: {error}") from error
    tokens = _array(path, reader, Keys.Tokenizer.LIST, str)
    scores = [float(score) for score in _array(path, reader, Keys.Tokenizer.SCORES, float)]
    token_types = _array(path, reader, Keys.Tokenizer.TOKEN_TYPE, int)
    if not tokens or len(scores) != len(tokens) or len(token_types) != len(tokens):
        raise GGUFModelError(
            path,
            f"the vocabulary has {len(tokens)} tokens, {len(scores)} scores, {len(token_types)} token types",
        )
    if len(set(scores)) == 1:
        raise GGUFModelError(
            path,
            f"every {Keys.Tokenizer.SCORES} entry is {scores[0]}, so the unigram tokenizer cannot be rebuilt "
            f"from the metadata (Antfly's exporter writes no scores); put the model's {TOKENIZER_JSON} next "
            "to the file",
        )
    special_ids = [_integer(path, reader, key) for key in SPECIAL_ID_KEYS]
    if any(not 0 <= token_id < len(tokens) for token_id in special_ids):
        raise GGUFModelError(path, f"special token ids {special_ids} fall outside the {len(tokens)} tokens")
    charsmap_field = reader.get_field(PRECOMPILED_CHARSMAP_KEY)
    charsmap = bytes(_array(path, reader, PRECOMPILED_CHARSMAP_KEY, int)) if charsmap_field else None
    try:
        return tokenizer_from_vocabulary(
            tokens, scores, token_types, *special_ids, precompiled_charsmap=charsmap
        )
    # tokenizers reports an invalid vocabulary or charsmap as a bare Exception.
    except Exception as error:
        raise GGUFModelError(path, f"tokenizer.ggml.* does not give a tokenizer: {error}") from error


def _torch_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    return tuple(int(dimension) for dimension in reversed(tensor.shape.tolist()))
