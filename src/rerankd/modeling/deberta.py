"""The DeBERTa-v2/v3 sequence classifier, written for inference.

Equal to transformers' `DebertaV2ForSequenceClassification` (eager) but shaped for serving:
- Q, K and V are one fused projection.
- The relative-position projections `Kr = key_proj(LN(rel))` and `Qr = query_proj(LN(rel))` depend only on the
  weights, so they are computed once when the weights are loaded, not in every forward.
- The attention scale is folded into the query projection's weights at load.
- The relative terms are multiplied, block by block of 64 queries (c2p) or keys (p2c), against one table
  row per distance the block reaches, so the term of every (i, j) sits at a fixed stride in the product: a
  strided view, not a gather.
- Padding never reaches the dense layers: a batch's tokens are packed, (tokens, hidden), for the projections,
  the feed-forward network and the norms, and laid out padded, (batch, length), for attention alone: the
  dense layers do no work on padding (docs/decisions.md).
- The last layer computes the first token alone (its output is all the pooler reads): keys and values come
  from every token, but the query, attention, output projection and feed-forward network only from the
  first, which skips about three quarters of that layer's work.
- In bfloat16 on a CPU with AVX512-BF16 or AMX, a layer's whole attention is one C kernel over the packed
  Q/K/V (`fused_attention.packed_context`): scores, both relative terms, softmax and context block by block
  of 16 queries (in AMX tiles where the CPU has them), over each pair's own tokens, written straight into
  packed rows.
- Elsewhere on a CPU, the scores (`bmm`), the two relative terms and the mask meet in one C kernel that
  writes the probabilities (`fused_attention`). On a GPU, and in the last layer, attention is `baddbmm`
  (the relative bias enters as the matmul's addend) then softmax and `bmm`: on a CPU faster than
  `scaled_dot_product_attention` with a bias at these lengths; on a GPU, SDPA's cuDNN kernel plans every new
  batch shape anew (see `attend`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from rerankd.modeling import fused_attention
from rerankd.modeling.config import DebertaConfig
from rerankd.modeling.relative import (
    FirstQueryRelativeIndex,
    RelativeIndex,
    RelativeProjections,
    relative_slot_table,
)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "tanh": torch.tanh,
    "silu": F.silu,
    "swish": F.silu,
}


# The packed attention kernel's time, under torch's profiler.
PACKED_ATTENTION_OP = "rerankd::packed_attention"
# On a CPU the dense layers see a pass's tokens in a multiple of this many rows: oneDNN builds a kernel for
# every row count it meets (4-10 ms a layer for base on AMX), so 16 counts up to the default budget of 1,024
# tokens recur across passes, where each pass's own count would be new (docs/decisions.md).
CPU_ROW_MULTIPLE = 64


@dataclass(frozen=True)
class TokenLayout:
    """Where a right-padded batch's tokens sit: the dense layers see them packed, (rows, width), in row
    order; attention sees them padded, (batch, length, width), with zeros at the padding (finite, so masked
    keys and values add exactly nothing). Packed rows past the tokens repeat the first token's: computed,
    never read."""

    batch: int
    length: int
    token_rows: torch.Tensor  # each token's row in the padded (batch x length) layout, in order
    first_tokens: torch.Tensor  # each pair's first token's row in the packed layout
    packed_rows: torch.Tensor  # the padded layout's row of each packed row: the tokens', then repeats
    # Every position is a token (no padding, or `dense`): laying the projections out by head is a plain
    # copy, with no scatter, and packing a view unless rows were added to round the count up.
    all_positions: bool = False
    # (2, batch) int32: each pair's first packed row and its token count, where each pair's tokens are its
    # first positions (right padding); what the packed attention kernel reads. None otherwise.
    pair_spans: torch.Tensor | None = None

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, row_multiple: int = 1) -> TokenLayout:
        """The layout of a (batch, length) mask, its packed rows a multiple of `row_multiple`. Finding the
        tokens (`nonzero`) waits for the device, so a backend feeding a GPU builds it from the host's mask
        and moves it over (`to`). A mask without padding (pairs of one length, such as documents cut at the
        model's limit) lays out as `dense` does, with plain copies (docs/decisions.md)."""
        lengths = attention_mask.sum(1)
        batch, length = attention_mask.shape
        token_rows = attention_mask.reshape(-1).nonzero().squeeze(1)
        repeats = -len(token_rows) % row_multiple
        packed_rows = torch.cat([token_rows, token_rows[:1].expand(repeats)]) if repeats else token_rows
        first_tokens = torch.cumsum(lengths, 0) - lengths
        right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
        spans = torch.stack([first_tokens, lengths]).int() if right_padded else None
        all_positions = len(token_rows) == batch * length
        return cls(batch, length, token_rows, first_tokens, packed_rows, all_positions, spans)

    @classmethod
    def dense(cls, batch: int, length: int, device: torch.device) -> TokenLayout:
        """Every position of a (batch, length) batch counted as a token, padding included, as the reference
        computes it: one fixed layout per shape, for a pass captured once and replayed (a CUDA graph). The
        padding's own outputs are never read; as keys the attention mask hides them. Packing is then a
        view, and laying the projections out by head a plain copy, with no scatter."""
        rows = torch.arange(batch * length, device=device)
        return cls(batch, length, rows, torch.arange(0, batch * length, length, device=device), rows, True)

    def to(self, device: torch.device) -> TokenLayout:
        """This layout on `device`; from the host to a GPU through page-locked memory, so the copies are
        queued without waiting."""
        if device.type == "cpu":
            return self

        def moved(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.pin_memory().to(device, non_blocking=True)

        token_rows = moved(self.token_rows)
        # Without rows to round up to, the packed rows are the token rows: one copy serves both.
        packed_rows = token_rows if self.packed_rows is self.token_rows else moved(self.packed_rows)
        spans = None if self.pair_spans is None else moved(self.pair_spans)
        return replace(
            self,
            token_rows=token_rows,
            first_tokens=moved(self.first_tokens),
            packed_rows=packed_rows,
            pair_spans=spans,
        )

    def packed(self, padded: torch.Tensor) -> torch.Tensor:
        """(batch x length, ...) rows to the packed rows: the tokens', then the repeats."""
        if self.all_positions and len(self.packed_rows) == len(padded):
            return padded
        return padded.index_select(0, self.packed_rows)

    def padded_heads(self, packed: torch.Tensor, heads: int, size: int) -> torch.Tensor:
        """Projected (packed rows, parts x heads x size) Q/K/V to (parts, heads, batch, length, size), the
        tokens' rows only, zeros at the padding, in one copy: each head's relative terms are then one matmul
        over all of the batch's tokens, and attention one batched matmul over heads x batch
        (docs/decisions.md)."""
        rows, width = packed.shape
        parts = width // (heads * size)
        by_head = packed.view(rows, parts, heads, size).permute(1, 2, 0, 3)
        shape = (parts, heads, self.batch, self.length, size)
        if self.all_positions:
            return by_head[:, :, : len(self.token_rows)].contiguous().view(shape)
        padded = packed.new_zeros(parts, heads, self.batch * self.length, size)
        return padded.index_copy_(2, self.token_rows, by_head[:, :, : len(self.token_rows)]).view(shape)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(query . key + bias) . value for (heads, batch, length, size) inputs with the scale applied, as
    `baddbmm` (the bias is the matmul's addend), softmax and `bmm` over heads x batch. On a CPU this is
    faster than SDPA with a bias; on a GPU, SDPA picks cuDNN's kernel, which builds a plan for every new
    batch shape, and these matmuls match its speed without one (docs/decisions.md)."""
    heads, batch, queries, size = query.shape
    keys = (heads * batch, key.shape[2], size)
    scores = torch.baddbmm(
        bias.reshape(heads * batch, queries, keys[1]),
        query.view(heads * batch, queries, size),
        key.view(keys).transpose(1, 2),
    )
    return weighted_values(torch.softmax(scores, dim=-1), value)


def weighted_values(probabilities: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """(heads x batch, queries, L) probabilities times (heads, batch, L, size) values, by head and pair."""
    heads, batch, length, size = value.shape
    context = torch.bmm(probabilities, value.view(heads * batch, length, size))
    return context.view(heads, batch, -1, size)


class StepBoundary(nn.Identity):
    """A point inside a layer where a pass may pause: it computes nothing, and a serving backend hooks it
    (with the layer's other children) to run a short pass there. Marks the attention's long stretches, which
    hold no module of their own."""


class DebertaLayer(nn.Module):
    """One transformer block: disentangled self-attention then the feed-forward network, both post-norm.

    With `first_token_only` (the last layer) it computes the first token's output alone, (batch, hidden):
    keys and values still come from every token, the query from the first, through its own projection.
    """

    def __init__(self, config: DebertaConfig, first_token_only: bool = False) -> None:
        super().__init__()
        inner = config.num_attention_heads * config.attention_head_size
        self.num_heads = config.num_attention_heads
        self.head_size = config.attention_head_size
        self.first_token_only = first_token_only
        if first_token_only:
            self.query = nn.Linear(config.hidden_size, inner)
            self.key_value = nn.Linear(config.hidden_size, 2 * inner)
        else:
            self.qkv = nn.Linear(config.hidden_size, 3 * inner)
        self.attention_output = nn.Linear(inner, config.hidden_size)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.scale = 1.0 / math.sqrt(self.head_size * config.attention_scale_factor)
        self.step_boundary = StepBoundary()
        # What the dense layers and attention compute in; None: the hidden states' own (`compute_in`).
        self.compute_dtype: torch.dtype | None = None
        # Per-head relative projections, filled at load by `set_relative_projections`.
        # c2p uses the keys of the relative table, p2c its queries (pre-multiplied by `scale`).
        self.register_buffer("relative_keys", None, persistent=False)
        self.register_buffer("relative_queries", None, persistent=False)
        # The two tables as the packed kernel reads them, after the tensors they came from (`_packed_tables`).
        self._packed_layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def set_relative_projections(
        self,
        table: torch.Tensor,
        key_projection: tuple[torch.Tensor, torch.Tensor] | None,
        query_projection: tuple[torch.Tensor, torch.Tensor] | None,
        dtype: torch.dtype,
    ) -> None:
        """Project the normalized relative table once, in float32, and keep it per head in `dtype`."""
        heads = (-1, self.num_heads, self.head_size)
        if key_projection is not None:
            keys = F.linear(table, key_projection[0].float(), key_projection[1].float())
            self.relative_keys = keys.view(heads).transpose(0, 1).to(dtype).contiguous()
        if query_projection is not None:
            queries = F.linear(table, query_projection[0].float(), query_projection[1].float()) * self.scale
            self.relative_queries = queries.view(heads).transpose(0, 1).to(dtype).contiguous()

    def compute_in(self, dtype: torch.dtype) -> None:
        """Compute the dense layers and attention in `dtype` while the hidden states between them (the
        residual stream) and the norms keep theirs: `--dtype bfloat16-mixed` (docs/decisions.md)."""
        for module in self.children():
            if isinstance(module, nn.Linear):
                module.to(dtype)
        for name in ("relative_keys", "relative_queries"):
            table = getattr(self, name)
            if table is not None:
                setattr(self, name, table.to(dtype))
        self.compute_dtype = dtype

    def forward(
        self,
        hidden: torch.Tensor,
        layout: TokenLayout,
        key_mask_bias: torch.Tensor,
        relative: RelativeIndex | None,
    ) -> torch.Tensor:
        """Packed (tokens, hidden) in; packed out, or (batch, hidden) of the first tokens with
        `first_token_only`. `key_mask_bias` comes in the compute dtype."""
        heads = self.num_heads
        stream, compute = hidden.dtype, self.compute_dtype or hidden.dtype
        inputs = hidden.to(compute)  # no copy unless the precision is mixed
        if self.first_token_only:
            residual = hidden.index_select(0, layout.first_tokens)
            # (heads, batch, 1, size)
            query = self.query(residual.to(compute)).view(layout.batch, 1, heads, -1)
            query = query.permute(2, 0, 1, 3).contiguous()
            key, value = layout.padded_heads(self.key_value(inputs), heads, self.head_size)
            index = relative.first_query() if relative is not None else None
            context = self.rows_of(self.attention(query, key, value, key_mask_bias, index))
        else:
            residual = hidden
            qkv = self.qkv(inputs)
            packed_context = self.packed_attention(qkv, layout, relative)
            if packed_context is None:
                query, key, value = layout.padded_heads(qkv, heads, self.head_size)
                by_head = self.attention(query, key, value, key_mask_bias, relative)
                context = layout.packed(self.rows_of(by_head))
            else:
                context = packed_context
        attended = self.attention_norm(self.attention_output(context).to(stream) + residual)
        projected = self.output(self.activation(self.intermediate(attended.to(compute))))
        return self.output_norm(projected.to(stream) + attended)

    @staticmethod
    def rows_of(context: torch.Tensor) -> torch.Tensor:
        """(heads, batch, queries, size) context as (batch x queries, heads x size) rows."""
        heads, batch, queries, size = context.shape
        return context.permute(1, 2, 0, 3).reshape(batch * queries, heads * size)

    def packed_attention(
        self, qkv: torch.Tensor, layout: TokenLayout, relative: RelativeIndex | None
    ) -> torch.Tensor | None:
        """The whole attention's packed context by the packed kernel, from the fused projection's packed
        output: where it runs (bfloat16 on a CPU with AVX512-BF16 or AMX, right-padded pairs, both relative
        terms, heads of 64).
        None elsewhere: then the projections are laid out by head and `attention` runs."""
        if (
            relative is None
            or layout.pair_spans is None
            or self.relative_keys is None
            or self.relative_queries is None
            or self.head_size != fused_attention.PACKED_HEAD_SIZE
            or not fused_attention.packed_available(qkv)
        ):
            return None
        key_tiles, query_table = self._packed_tables(self.relative_keys, self.relative_queries)
        with torch.profiler.record_function(PACKED_ATTENTION_OP):
            return fused_attention.packed_context(
                qkv, layout.pair_spans, key_tiles, query_table, relative.distance_slots, layout.length
            )

    def _packed_tables(self, keys: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The relative tables laid out for the packed kernel, once per pair of tables: kept with the tensors
        they came from, and laid out anew when a load or a cast replaces them."""
        layout = self._packed_layout
        if layout is None or layout[0] is not keys or layout[1] is not queries:
            layout = self._packed_layout = (keys, queries, *fused_attention.packed_tables(keys, queries))
        return layout[2], layout[3]

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_mask_bias: torch.Tensor,
        index: RelativeIndex | FirstQueryRelativeIndex | None,
    ) -> torch.Tensor:
        """The attention's context, (heads, batch, queries, size): by the fused kernel where it runs (every
        layer but the last, on a CPU), else the relative bias then `attend`."""
        heads, batch, queries = query.shape[:3]
        projections = RelativeProjections(self.relative_keys, self.relative_queries, self.step_boundary)
        if isinstance(index, RelativeIndex):
            probabilities = index.probabilities(key_mask_bias, query, key, projections)
            if probabilities is not None:
                return weighted_values(probabilities, value)
        if index is None:
            bias = key_mask_bias.expand(heads, batch, queries, key.shape[2])
        else:
            bias = index.attention_bias(key_mask_bias, query, key, projections)
        return attend(query, key, value, bias)


class DebertaReranker(nn.Module):
    """DeBERTa encoder + context pooler + classifier; returns one relevance logit per pair."""

    slot_table: torch.Tensor  # a buffer: the relative-table slot of every distance

    def __init__(self, config: DebertaConfig) -> None:
        super().__init__()
        self.config = config
        # An nn.Embedding; while `--dtype auto` checks the faster dtype, a `Float32Rows` around it.
        self.word_embeddings: nn.Module = nn.Embedding(config.vocab_size, config.embedding_size)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.embedding_size)
            if config.position_biased_input
            else None
        )
        self.embed_proj = (
            nn.Linear(config.embedding_size, config.hidden_size, bias=False)
            if config.embedding_size != config.hidden_size
            else None
        )
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # The pooler reads the first token alone, so the last layer computes nothing else.
        last = config.num_hidden_layers - 1
        self.layers = nn.ModuleList(
            DebertaLayer(config, first_token_only=index == last) for index in range(config.num_hidden_layers)
        )
        self.pooler = nn.Linear(config.pooler_hidden_size, config.pooler_hidden_size)
        self.pooler_activation = ACTIVATIONS[config.pooler_hidden_act]
        self.classifier = nn.Linear(config.pooler_hidden_size, config.num_labels)
        slot_table = relative_slot_table(config)
        self.register_buffer("slot_table", slot_table, persistent=False)

    def normalized_relative_table(
        self, relative_embeddings: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """The relative-position embedding table after its LayerNorm, in float32 (the projections' input)."""
        table = relative_embeddings.float()[: 2 * self.config.relative_span]
        if norm is None:
            return table
        return F.layer_norm(
            table, (table.shape[-1],), norm[0].float(), norm[1].float(), self.config.layer_norm_eps
        )

    def compute_layers_in(self, dtype: torch.dtype) -> None:
        """Every layer's dense layers and attention in `dtype`; the embeddings, the residual stream, the
        norms and the head keep theirs (`DebertaLayer.compute_in`)."""
        for layer in self.layers:
            cast(DebertaLayer, layer).compute_in(dtype)

    def relative_index(self, length: int) -> RelativeIndex:
        """The relative-table slots each block of a length-L batch's relative products reaches."""
        return RelativeIndex.for_length(self.slot_table, self.config.max_position_embeddings, length)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: TokenLayout | None = None
    ) -> torch.Tensor:
        """Logits of shape (batch, num_labels) for right-padded `input_ids`; `layout` is the mask's, when the
        caller has it already."""
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds {self.config.max_position_embeddings}")
        # The attention's dtype: the layers' compute dtype where the precision is mixed.
        dtype = cast(DebertaLayer, self.layers[0]).compute_dtype or self.classifier.weight.dtype
        if layout is None:
            layout = TokenLayout.from_mask(attention_mask)
        hidden = self.word_embeddings(layout.packed(input_ids.reshape(-1)))
        if self.position_embeddings is not None:
            hidden = hidden + self.position_embeddings(layout.packed_rows % length)
        if self.embed_proj is not None:
            hidden = self.embed_proj(hidden)
        hidden = self.embedding_norm(hidden)

        mask = attention_mask.to(dtype)
        key_mask_bias = ((1.0 - mask) * torch.finfo(dtype).min)[None, :, None, :]
        relative = self.relative_index(length) if self.config.relative_attention else None
        for layer in self.layers:
            hidden = layer(hidden, layout, key_mask_bias, relative)
        pooled = self.pooler_activation(self.pooler(hidden))
        return self.classifier(pooled)

    def relevance_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: TokenLayout | None = None
    ) -> torch.Tensor:
        """One logit per pair whose sigmoid is the relevance: the logit itself, or l1 - l0 for two labels."""
        logits = self.forward(input_ids, attention_mask, layout).float()
        if self.config.num_labels == 1:
            return logits[:, 0]
        return logits[:, 1] - logits[:, 0]
