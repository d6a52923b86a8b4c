"""The input embeddings of a llama.cpp BERT GGUF trained with segment ids, for feeding llama.cpp vectors.

llama.cpp's BERT graph adds token type row 0 to every token (its API takes no token types) and then the
position embedding. Fed `token_embd[id] + (token_types[type] - token_types[0])` as input embeddings instead of
ids, the graph's own sum comes out as BERT's `token + type + position`, so each pair's second segment gets its
type 1. The tables are read once at load and kept in float32, whatever the file stores them as.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from rerankd.formats.gguf_file import GGUFModelError

TOKEN_EMBEDDINGS = "token_embd.weight"
TOKEN_TYPE_EMBEDDINGS = "token_types.weight"


@dataclass(frozen=True)
class SegmentEmbeddings:
    """The token embedding table and each token type's offset from type 0, both (rows, hidden) float32."""

    tokens: np.ndarray
    type_offsets: np.ndarray

    @property
    def width(self) -> int:
        return int(self.tokens.shape[1])

    def rows(self, ids: Sequence[int], types: Sequence[int]) -> np.ndarray:
        """One input row per token: its embedding plus its type's offset, (len(ids), hidden) float32."""
        return self.tokens[np.asarray(ids)] + self.type_offsets[np.asarray(types)]


def segment_embeddings(path: Path, reader: GGUFReader) -> SegmentEmbeddings | None:
    """The file's segment embeddings when it has two token types or more; None when every token has type 0
    (no `token_types.weight`, or one row), which llama.cpp's id input already gets right."""
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    token_types = tensors.get(TOKEN_TYPE_EMBEDDINGS)
    if token_types is None or int(token_types.shape[-1]) < 2:
        return None
    if TOKEN_EMBEDDINGS not in tensors:
        raise GGUFModelError(path, f"has {TOKEN_TYPE_EMBEDDINGS} but no {TOKEN_EMBEDDINGS}")
    types = _float32_table(path, token_types)
    return SegmentEmbeddings(_float32_table(path, tensors[TOKEN_EMBEDDINGS]), types - types[0])


def _float32_table(path: Path, tensor: ReaderTensor) -> np.ndarray:
    """A 2-D tensor as a (rows, hidden) float32 array, dequantized from any type the gguf package reads."""
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise GGUFModelError(
            path, f"cannot read {tensor.name} ({tensor.tensor_type.name}): {error}"
        ) from error
    rows, width = int(tensor.shape[1]), int(tensor.shape[0])  # ggml lists the row length first
    return np.array(values, dtype=np.float32).reshape(rows, width)
