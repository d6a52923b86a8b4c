"""Build a `DebertaReranker` from a checkpoint's own tensor names, one tensor at a time.

Checkpoints name tensors as transformers does (`deberta.encoder.layer.0.attention.self.query_proj.weight`);
GGUF files drop the `deberta.` prefix. Both are read through `TensorReader`, so the network never depends on
the file format. Each tensor goes straight to the target dtype and device; no full-precision copy of the whole
checkpoint is ever held.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Protocol, cast

import torch

from rerankd.modeling.config import DebertaConfig
from rerankd.modeling.deberta import DebertaLayer, DebertaReranker
from rerankd.modeling.reference_rows import Float32Rows
from rerankd.modeling.relative import relative_slot_table


class TensorReader(Protocol):
    """Random access to a checkpoint's tensors by name."""

    def names(self) -> Iterable[str]: ...

    def read(self, name: str) -> torch.Tensor: ...


class CheckpointError(ValueError):
    """The checkpoint's tensors do not match its config (missing or misshaped)."""


class _Tensors:
    """Name lookup that accepts both `deberta.`-prefixed and bare names and checks shapes."""

    def __init__(self, reader: TensorReader, dtype: torch.dtype, device: torch.device) -> None:
        self._reader = reader
        self._by_bare_name = {name.removeprefix("deberta."): name for name in reader.names()}
        self.dtype = dtype
        self._device = device

    def has(self, name: str) -> bool:
        return name in self._by_bare_name

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor as stored, checked against `shape`."""
        if name not in self._by_bare_name:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        tensor = self._reader.read(self._by_bare_name[name])
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
        return tensor

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.read(name, shape).to(device=self._device, dtype=dtype or self.dtype)

    def word_embeddings(
        self, shape: tuple[int, int], split: SplitEmbeddings | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The table in the load's dtype; with `split`, in its dtype, plus the kept ids and float32 rows."""
        name = "embeddings.word_embeddings.weight"
        if split is None:
            return self.get(name, shape), None
        stored = self.read(name, shape)
        token_ids = torch.tensor(sorted(i for i in split.token_ids if 0 <= i < shape[0]), dtype=torch.long)
        rows = stored[token_ids].to(device=self._device, dtype=torch.float32)
        return stored.to(device=self._device, dtype=split.dtype), (token_ids.to(self._device), rows)

    def linear(self, prefix: str, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.get(f"{prefix}.weight", (out_features, in_features)),
            self.get(f"{prefix}.bias", (out_features,)),
        )

    def linear_float32(
        self, prefix: str, out_features: int, in_features: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.get(f"{prefix}.weight", (out_features, in_features), torch.float32),
            self.get(f"{prefix}.bias", (out_features,), torch.float32),
        )


@dataclass(frozen=True)
class SplitEmbeddings:
    """Load the word-embedding table in `dtype` (the serving one) and float32 copies of `token_ids`' rows
    only, for a float32 pass over inputs known in advance (see `Float32Rows`)."""

    dtype: torch.dtype
    token_ids: Collection[int]


def load_reranker(
    config: DebertaConfig,
    reader: TensorReader,
    dtype: torch.dtype,
    device: torch.device,
    split: SplitEmbeddings | None = None,
) -> DebertaReranker:
    """Materialize the network from `reader` in `dtype` on `device`, in inference mode; with `split`, its
    word embeddings are `Float32Rows` until swapped for their `serving` table."""
    with torch.device("meta"):
        model = DebertaReranker(config)
    tensors = _Tensors(reader, dtype, device)
    hidden, embed = config.hidden_size, config.embedding_size
    inner = config.num_attention_heads * config.attention_head_size
    # First, so that the stored table (the largest weight) is gone before any other weight arrives.
    word_table, reference = tensors.word_embeddings((config.vocab_size, embed), split)
    state: dict[str, torch.Tensor] = {
        "word_embeddings.weight": word_table,
        "embedding_norm.weight": tensors.get("embeddings.LayerNorm.weight", (hidden,)),
        "embedding_norm.bias": tensors.get("embeddings.LayerNorm.bias", (hidden,)),
        "pooler.weight": tensors.get(
            "pooler.dense.weight", (config.pooler_hidden_size, config.pooler_hidden_size)
        ),
        "pooler.bias": tensors.get("pooler.dense.bias", (config.pooler_hidden_size,)),
        "classifier.weight": tensors.get("classifier.weight", (config.num_labels, config.pooler_hidden_size)),
        "classifier.bias": tensors.get("classifier.bias", (config.num_labels,)),
    }
    if config.position_biased_input:
        state["position_embeddings.weight"] = tensors.get(
            "embeddings.position_embeddings.weight", (config.max_position_embeddings, embed)
        )
    if config.embedding_size != config.hidden_size:
        state["embed_proj.weight"] = tensors.get("embeddings.embed_proj.weight", (hidden, embed))

    table = _relative_table(config, tensors, model) if config.relative_attention else None
    for index in range(config.num_hidden_layers):
        prefix = f"encoder.layer.{index}"
        attention = f"{prefix}.attention.self"
        query = tensors.linear(f"{attention}.query_proj", inner, hidden)
        key = tensors.linear(f"{attention}.key_proj", inner, hidden)
        value = tensors.linear(f"{attention}.value_proj", inner, hidden)
        # The attention scale goes into the query rows (in float32), so no forward pass multiplies by it.
        layer = cast(DebertaLayer, model.layers[index])
        scaled_query = [(tensor.float() * layer.scale).to(tensors.dtype) for tensor in query]
        for part, (weight, bias) in _query_key_value(layer, scaled_query, key, value).items():
            state[f"layers.{index}.{part}.weight"], state[f"layers.{index}.{part}.bias"] = weight, bias
        del value
        for ours, theirs, shape in (
            ("attention_output", f"{prefix}.attention.output.dense", (hidden, inner)),
            ("intermediate", f"{prefix}.intermediate.dense", (config.intermediate_size, hidden)),
            ("output", f"{prefix}.output.dense", (hidden, config.intermediate_size)),
        ):
            state[f"layers.{index}.{ours}.weight"], state[f"layers.{index}.{ours}.bias"] = tensors.linear(
                theirs, *shape
            )
        for ours, theirs in (
            ("attention_norm", f"{prefix}.attention.output.LayerNorm"),
            ("output_norm", f"{prefix}.output.LayerNorm"),
        ):
            state[f"layers.{index}.{ours}.weight"] = tensors.get(f"{theirs}.weight", (hidden,))
            state[f"layers.{index}.{ours}.bias"] = tensors.get(f"{theirs}.bias", (hidden,))
        if table is not None:
            _set_layer_relative_projections(config, tensors, model, index, table, query, key)

    model.load_state_dict(state, strict=True, assign=True)
    model.slot_table = relative_slot_table(config).to(device)
    if reference is not None:
        model.word_embeddings = Float32Rows(cast(torch.nn.Embedding, model.word_embeddings), *reference)
    return model.eval().requires_grad_(False)


def _query_key_value(
    layer: DebertaLayer,
    query: list[torch.Tensor],
    key: tuple[torch.Tensor, torch.Tensor],
    value: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The layer's fused projections: Q, K and V as one, or (first-token layer) Q apart from K and V."""
    if layer.first_token_only:
        return {
            "query": (query[0], query[1]),
            "key_value": (torch.cat([key[0], value[0]]), torch.cat([key[1], value[1]])),
        }
    return {"qkv": (torch.cat([query[0], key[0], value[0]]), torch.cat([query[1], key[1], value[1]]))}


def _relative_table(config: DebertaConfig, tensors: _Tensors, model: DebertaReranker) -> torch.Tensor:
    rows = 2 * config.relative_span
    embeddings = tensors.get("encoder.rel_embeddings.weight", (rows, config.hidden_size), torch.float32)
    norm = None
    if config.norm_rel_embeddings:
        norm = (
            tensors.get("encoder.LayerNorm.weight", (config.hidden_size,), torch.float32),
            tensors.get("encoder.LayerNorm.bias", (config.hidden_size,), torch.float32),
        )
    return model.normalized_relative_table(embeddings, norm)


def _set_layer_relative_projections(
    config: DebertaConfig,
    tensors: _Tensors,
    model: DebertaReranker,
    index: int,
    table: torch.Tensor,
    query: tuple[torch.Tensor, torch.Tensor],
    key: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """c2p needs keys of the relative table, p2c its queries: shared with the content projections or not."""
    inner = config.num_attention_heads * config.attention_head_size
    attention = f"encoder.layer.{index}.attention.self"
    key_projection: tuple[torch.Tensor, torch.Tensor] | None
    query_projection: tuple[torch.Tensor, torch.Tensor] | None
    if config.share_att_key:
        key_projection, query_projection = key, query
    else:
        key_projection = (
            tensors.linear_float32(f"{attention}.pos_key_proj", inner, config.hidden_size)
            if "c2p" in config.pos_att_type
            else None
        )
        query_projection = (
            tensors.linear_float32(f"{attention}.pos_query_proj", inner, config.hidden_size)
            if "p2c" in config.pos_att_type
            else None
        )
    cast(DebertaLayer, model.layers[index]).set_relative_projections(
        table,
        key_projection if "c2p" in config.pos_att_type else None,
        query_projection if "p2c" in config.pos_att_type else None,
        tensors.dtype,
    )
