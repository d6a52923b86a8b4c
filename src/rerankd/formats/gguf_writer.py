"""Export a Hugging Face DeBERTa-v3 reranker folder to one GGUF file in the Antfly Inference layout.

The file is what Antfly's own exporter writes (see gguf_layout), so Antfly's runtime and ours read the
same artifacts. Tensors are converted and written one at a time through `gguf.GGUFWriter`'s streaming
calls (header, then metadata, then tensor infos, then each tensor's data): the largest thing ever in
memory is one tensor in float32. Q8_0 comes from `gguf.quants` (bit-exact with ggml), Q4_K from our
port of ggml's reference quantizer.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize
from tokenizers import Tokenizer

from rerankd.formats.gguf_layout import (
    ALIGNMENT,
    ARCHITECTURE,
    DEFAULT_KEEP,
    EXPORT_TYPES,
    LAYER_NORM_EPSILON_KEY,
    TOKENIZER_MODEL,
    config_from_metadata,
    expected_tensor_shapes,
    gguf_tensor_name,
    metadata_from_config,
    stored_type,
    tensor_nbytes,
)
from rerankd.formats.q4k import quantize_q4_k
from rerankd.formats.safetensors import SafetensorsCheckpoint, SafetensorsCheckpointError
from rerankd.formats.sentencepiece import special_token_content
from rerankd.formats.tokenizer import TOKENIZER_CONFIG, TokenizerLoadError, load_tokenizer
from rerankd.modeling.config import DebertaConfig, UnsupportedModelError

SOURCE_TYPES: dict[torch.dtype, GGMLQuantizationType] = {
    torch.float32: GGMLQuantizationType.F32,
    torch.float16: GGMLQuantizationType.F16,
    torch.bfloat16: GGMLQuantizationType.BF16,
}


class GGUFExportError(ValueError):
    """The source folder cannot be written in the layout; the message names the folder and the problem."""


@dataclass(frozen=True)
class GGUFVocabulary:
    """The tokenizer.ggml.* content: unigram pieces, then added tokens, with Antfly's token types."""

    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    bos_id: int
    eos_id: int
    unknown_id: int
    padding_id: int
    precompiled_charsmap: bytes | None


@dataclass(frozen=True)
class _PlannedTensor:
    source_name: str
    name: str
    shape: tuple[int, ...]
    stored: GGMLQuantizationType

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape))


def export_gguf(
    src: Path, out: Path, qtype: str, keep: Sequence[str] | None = None, progress: bool = False
) -> None:
    """Write `src` (config.json, safetensors, tokenizer files) to `out` as a `qtype` GGUF file.

    `qtype` is q8_0, q4_k, f16 or f32. `keep` lists tensor-name prefixes (with or without `deberta.`)
    left unquantized; None means the layout's default (the word embeddings for q8_0). The file
    appears at `out` only once complete.
    """
    if qtype not in EXPORT_TYPES:
        raise GGUFExportError(f"unknown GGUF type {qtype!r}; choose one of {sorted(EXPORT_TYPES)}")
    target = EXPORT_TYPES[qtype]
    keep_prefixes = tuple(
        gguf_tensor_name(prefix) for prefix in (DEFAULT_KEEP.get(qtype, ()) if keep is None else keep)
    )
    config = _read_config(src)
    vocabulary = read_vocabulary(src)
    _check_layout_describes(src, config, vocabulary)
    try:
        checkpoint = SafetensorsCheckpoint(src)
    except SafetensorsCheckpointError as error:
        raise GGUFExportError(str(error)) from error
    plan = _plan_tensors(src, config, checkpoint, target, keep_prefixes)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = GGUFWriter(partial, ARCHITECTURE)
    try:
        _add_metadata(writer, config, vocabulary)
        for item in plan:
            # The torch-order shape and raw_dtype describe the tensor; GGUFWriter reverses the shape to
            # ggml order and reads the numpy dtype only when no raw_dtype is given (or for byte shapes).
            writer.add_tensor_info(
                item.name,
                item.shape,
                np.dtype(np.float32),
                tensor_nbytes(item.shape, item.stored),
                raw_dtype=item.stored,
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in _with_progress(plan, progress, out.name):
            writer.write_tensor_data(_convert(checkpoint.read(item.source_name), item.stored))
        writer.close()
        os.replace(partial, out)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)


def read_vocabulary(folder: Path) -> GGUFVocabulary:
    """The folder's unigram vocabulary as Antfly stores it: the tokenizer's pieces and scores, then its
    added tokens ([MASK] for DeBERTa-v3); special tokens are control, [UNK] unknown, the rest normal."""
    try:
        tokenizer = load_tokenizer(folder)
    except TokenizerLoadError as error:
        raise GGUFExportError(str(error)) from error
    serialized = json.loads(tokenizer.to_str())
    model = serialized["model"]
    if model["type"] != "Unigram":
        raise GGUFExportError(
            f"{folder}: the tokenizer is a {model['type']} model; the GGUF layout stores a unigram vocabulary"
        )
    tokens = [str(piece) for piece, _ in model["vocab"]]
    scores = [float(score) for _, score in model["vocab"]]
    special_ids: set[int] = set()
    for entry in sorted(serialized["added_tokens"], key=lambda entry: entry["id"]):
        token_id, content = entry["id"], entry["content"]
        if token_id == len(tokens):
            tokens.append(content)
            scores.append(0.0)
        elif token_id > len(tokens) or tokens[token_id] != content:
            raise GGUFExportError(
                f"{folder}: added token {content!r} has id {token_id}, which does not follow the "
                f"{len(tokens)} vocabulary entries before it"
            )
        if entry["special"]:
            special_ids.add(token_id)
    unknown_id = int(model["unk_id"])
    token_types = [_token_type(index, unknown_id, special_ids) for index in range(len(tokens))]
    config = _read_json(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else {}
    bos_id, eos_id, padding_id = (
        _token_id(folder, tokenizer, special_token_content(config, key))
        for key in ("cls_token", "sep_token", "pad_token")
    )
    return GGUFVocabulary(
        tokens=tokens,
        scores=scores,
        token_types=token_types,
        bos_id=bos_id,
        eos_id=eos_id,
        unknown_id=unknown_id,
        padding_id=padding_id,
        precompiled_charsmap=_precompiled_charsmap(serialized.get("normalizer")),
    )


def _token_type(token_id: int, unknown_id: int, special_ids: set[int]) -> int:
    """Antfly's token types: byte pieces count as normal, since the tokenizer has no byte fallback."""
    if token_id == unknown_id:
        return TokenType.UNKNOWN
    return TokenType.CONTROL if token_id in special_ids else TokenType.NORMAL


def _token_id(folder: Path, tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise GGUFExportError(f"{folder}: special token {token!r} is not in the vocabulary")
    return token_id


def _precompiled_charsmap(normalizer: Mapping[str, Any] | None) -> bytes | None:
    """SentencePiece's normalization table, wherever the tokenizer's normalizer holds it."""
    if not normalizer:
        return None
    if normalizer.get("type") == "Precompiled":
        return base64.b64decode(normalizer["precompiled_charsmap"])
    for step in normalizer.get("normalizers") or ():
        charsmap = _precompiled_charsmap(step)
        if charsmap is not None:
            return charsmap
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GGUFExportError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(content, dict):
        raise GGUFExportError(f"{path} holds a {type(content).__name__}, expected a JSON object")
    return content


def _read_config(src: Path) -> DebertaConfig:
    config_path = src / "config.json"
    if not config_path.is_file():
        raise GGUFExportError(f"{src}: no config.json")
    try:
        return DebertaConfig.from_dict(_read_json(config_path))
    except (UnsupportedModelError, KeyError, TypeError, ValueError) as error:
        raise GGUFExportError(f"{config_path}: {error}") from error


def _check_layout_describes(src: Path, config: DebertaConfig, vocabulary: GGUFVocabulary) -> None:
    """The layout stores nine numbers and assumes DeBERTa-v3 for the rest; refuse a model it would
    misdescribe rather than write a file that loads as a different network."""
    described = DebertaConfig.from_dict(
        config_from_metadata(metadata_from_config(config), vocabulary.padding_id)
    )
    differences = [
        f"{field.name}={getattr(config, field.name)!r} (the file says {getattr(described, field.name)!r})"
        for field in fields(config)
        if getattr(config, field.name) != getattr(described, field.name)
    ]
    if differences:
        raise GGUFExportError(f"{src}: the GGUF layout cannot store {', '.join(differences)}")
    if len(vocabulary.tokens) > config.vocab_size:
        raise GGUFExportError(
            f"{src}: the tokenizer has {len(vocabulary.tokens)} tokens but vocab_size is {config.vocab_size}"
        )


def _plan_tensors(
    src: Path,
    config: DebertaConfig,
    checkpoint: SafetensorsCheckpoint,
    target: GGMLQuantizationType,
    keep: Sequence[str],
) -> list[_PlannedTensor]:
    """Name, shape and stored type of every tensor the layout holds, in Antfly's (sorted) order; the
    checkpoint's other tensors are not part of the layout and are left out. Each tensor is read once
    here for its dtype (a TensorReader has no metadata-only call) and dropped again."""
    source_names = {gguf_tensor_name(name): name for name in checkpoint.names()}
    plan = []
    for name, shape in sorted(expected_tensor_shapes(config).items()):
        if name not in source_names:
            raise GGUFExportError(f"{src}: tensor {name!r} is missing from the checkpoint")
        tensor = checkpoint.read(source_names[name])
        if tuple(tensor.shape) != shape:
            raise GGUFExportError(f"{src}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
        if tensor.dtype not in SOURCE_TYPES:
            raise GGUFExportError(f"{src}: tensor {name!r} is {tensor.dtype}, not a float type")
        plan.append(
            _PlannedTensor(
                source_names[name],
                name,
                shape,
                stored_type(name, shape, SOURCE_TYPES[tensor.dtype], target, keep),
            )
        )
    return plan


def _add_metadata(writer: GGUFWriter, config: DebertaConfig, vocabulary: GGUFVocabulary) -> None:
    """general.alignment, the deberta.* keys and tokenizer.ggml.*, in the order Antfly writes them."""
    writer.add_custom_alignment(ALIGNMENT)
    for key, value in metadata_from_config(config).items():
        if key == LAYER_NORM_EPSILON_KEY:
            writer.add_float32(key, float(value))
        else:
            writer.add_uint32(key, int(value))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_tokenizer_model(TOKENIZER_MODEL)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.token_types)
    writer.add_bos_token_id(vocabulary.bos_id)
    writer.add_eos_token_id(vocabulary.eos_id)
    writer.add_unk_token_id(vocabulary.unknown_id)
    writer.add_pad_token_id(vocabulary.padding_id)
    if vocabulary.precompiled_charsmap:
        writer.add_precompiled_charsmap(vocabulary.precompiled_charsmap)


def _convert(tensor: torch.Tensor, stored: GGMLQuantizationType) -> np.ndarray:
    """The bytes (as a numpy array) that `stored` keeps for one tensor."""
    if stored == GGMLQuantizationType.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    values = tensor.to(torch.float32).contiguous().numpy()
    if stored == GGMLQuantizationType.Q4_K:
        return quantize_q4_k(values)
    # F32 comes back as is; Q8_0 and BF16 as ggml's bytes.
    return quantize(values, stored)


def _with_progress(
    plan: Sequence[_PlannedTensor], enabled: bool, description: str
) -> Iterator[_PlannedTensor]:
    """Yield the plan's tensors, showing the share of weights written (tqdm when installed)."""
    if not enabled:
        yield from plan
        return
    total = sum(item.elements for item in plan)
    try:
        from tqdm import tqdm
    except ImportError:
        done = 0
        for item in plan:
            yield item
            done += item.elements
            print(
                f"\r{description}: {100 * done // total}% ({item.name})", end="", file=sys.stderr, flush=True
            )
        print(file=sys.stderr)
        return
    with tqdm(total=total, desc=description, unit="weight", unit_scale=True) as bar:
        for item in plan:
            yield item
            bar.update(item.elements)
