"""DeBERTa's relative positions: the bucketed slot of every distance, and which slots each block of a batch's
relative products (c2p, p2c) multiplies against, read back as strided views rather than gathers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rerankd.modeling import fused_attention
from rerankd.modeling.config import DebertaConfig


def relative_slot_table(config: DebertaConfig) -> torch.Tensor:
    """Slot of the relative-position table for every distance r = i - j, indexed by r + (max_len - 1).

    Computed with the same float32 operations as the reference's log bucketing, so bucket boundaries agree.
    """
    max_len = config.max_position_embeddings
    cpu = torch.device("cpu")  # explicit: the model may be built under a meta-device context
    distance = torch.arange(-(max_len - 1), max_len, dtype=torch.long, device=cpu)
    span = config.relative_span
    if config.position_buckets > 0:
        mid = config.position_buckets // 2
        sign = torch.sign(distance)
        abs_pos = torch.where(
            (distance < mid) & (distance > -mid),
            torch.tensor(mid - 1, device=cpu).type_as(distance),
            torch.abs(distance),
        )
        log_pos = (
            torch.ceil(
                torch.log(abs_pos / mid)
                / torch.log(torch.tensor((config.max_relative_positions - 1) / mid, device=cpu))
                * (mid - 1)
            )
            + mid
        )
        distance = torch.where(abs_pos <= mid, distance.type_as(log_pos), log_pos * sign).to(torch.long)
    return torch.clamp(distance + span, 0, 2 * span - 1)


# The fused kernel's time, under torch's profiler.
FUSED_OP = "rerankd::attention_softmax"
# Queries (c2p) and keys (p2c) meet the relative table in blocks of about this many (docs/decisions.md).
RELATIVE_BLOCK = 64
# Each window is padded to a multiple of this many distances (never read): oneDNN's matmuls run up to 1.5x
# (bf16) and 2.8x (float32) faster on a product 576 rather than 575 wide (docs/decisions.md).
WINDOW_ALIGNMENT = 16


@dataclass(frozen=True)
class RelativeProjections:
    """What one layer multiplies a batch's relative terms against: its per-head projections of the relative
    table, (heads, 2 x span, size), None where the config has no such term, and `step`, which marks each
    term's end as a point where a pass may pause."""

    keys: torch.Tensor | None  # c2p: the table through the key projection
    queries: torch.Tensor | None  # p2c: the table through the query projection, the attention scale folded in
    step: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RelativeIndex:
    """Which relative-table slots a length-L batch's relative products multiply against, block by block.

    The c2p term of (i, j) is query_i . key_table[slot(i - j)]. A block of T queries, multiplied against one
    table row per distance its (i, j) reach in decreasing order (T + L - 1 of them), holds the term of (i, j)
    at row i - i0, column (T - 1) - (i - i0) + j of the product: a strided view, not a gather. The p2c term of
    (i, j) is key_j . query_table[slot(i - j)]: blocks of keys against their distances in increasing order,
    the same view with rows and columns swapped. Blocks keep the rows no pair needs few: multiplied whole
    (one block), a row would meet all 2L - 1 distances for the L it uses; in blocks of 64, L + 63. The
    sequence is cut into equal blocks, padded at its end by at most one position per block. Each window runs
    on past the distances its block reaches, to a multiple of `WINDOW_ALIGNMENT`: columns never read.
    """

    block: int  # T
    c2p_windows: torch.Tensor  # (blocks, >= L + T - 1): each block of queries' distances' slots, falling
    p2c_windows: torch.Tensor  # (blocks, >= padded L + T - 1): each block of keys' distances' slots, rising
    first_query_slots: torch.Tensor  # (L,): the slot of the distance -j, for key j
    # the packed kernel's: int32, the slot of the distance -k at k + reach, |k| <= reach = L +
    # PACKED_SLOT_REACH
    distance_slots: torch.Tensor

    @property
    def padded_length(self) -> int:
        return self.c2p_windows.shape[0] * self.block

    def attention_bias(
        self,
        key_mask_bias: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        projections: RelativeProjections,
    ) -> torch.Tensor:
        """The key mask plus the c2p and p2c terms of every (head, pair, i, j), (heads, batch, L, L), from the
        layer's `projections`."""
        heads, batch, length, _ = query.shape
        blocks, padded = self.c2p_windows.shape[0], self.padded_length
        relative_keys, relative_queries, step = projections.keys, projections.queries, projections.step
        if relative_queries is None:
            addend = key_mask_bias.unsqueeze(2)  # (1, batch, 1, 1, L)
        else:
            # p2c laid out (key, query), each key's row carrying its mask; read transposed below.
            key_rows = F.pad(key_mask_bias.reshape(1, batch, length), (0, padded - length))
            by_key = key.new_empty(heads, batch, padded, padded)
            torch.add(
                self._banded(key, relative_queries, self.p2c_windows, padded),
                key_rows.view(1, batch, blocks, self.block, 1),
                out=by_key.view(heads, batch, blocks, self.block, padded),
            )
            by_query = step(by_key).transpose(-1, -2)
            if relative_keys is None:
                return by_query[:, :, :length, :length]
            addend = by_query.unflatten(2, (blocks, self.block))[..., :length]
        if relative_keys is None:
            return addend.squeeze(2).expand(heads, batch, length, length)
        bias = query.new_empty(heads, batch, padded, length)
        torch.add(
            self._banded(query, relative_keys, self.c2p_windows, length),
            addend,
            out=bias.view(heads, batch, blocks, self.block, length),
        )
        return step(bias)[:, :, :length]

    def probabilities(
        self,
        key_mask_bias: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        projections: RelativeProjections,
    ) -> torch.Tensor | None:
        """softmax(query . key + c2p + p2c + key mask) of every (head, pair, i), (heads x batch, L, L), with
        the bias, the mask and the softmax in one pass of the fused kernel (`fused_attention`). None where
        that kernel cannot run (another device or dtype, no kernel on this machine, a config without both
        terms): then `attention_bias` and `attend`."""
        relative_keys, relative_queries, step = projections.keys, projections.queries, projections.step
        if relative_keys is None or relative_queries is None or not fused_attention.available(query):
            return None
        heads, batch, length, size = query.shape
        rows = (heads * batch, length, size)
        scores = torch.bmm(query.reshape(rows), key.reshape(rows).transpose(1, 2))
        c2p = step(self._product(query, relative_keys, self.c2p_windows))
        p2c = step(self._product(key, relative_queries, self.p2c_windows))
        mask = key_mask_bias.reshape(batch, length).float()
        with torch.profiler.record_function(FUSED_OP):
            if fused_attention.softmax_in_place(scores, c2p, p2c, mask, self.block):
                return scores
        return None

    def _banded(
        self, content: torch.Tensor, table: torch.Tensor, windows: torch.Tensor, columns: int
    ) -> torch.Tensor:
        """Each block of `content`'s (heads, batch, L, size) rows times its window of `table` rows, as the
        (heads, batch, block, row in block, `columns`) view of each row's distances in window order."""
        heads, batch = content.shape[:2]
        blocks, width = windows.shape
        product = self._product(content, table, windows)
        block_rows = batch * self.block * width
        return product.as_strided(
            (heads, batch, blocks, self.block, columns),
            (blocks * block_rows, self.block * width, block_rows, width - 1, 1),
            product.storage_offset() + self.block - 1,
        )

    def _product(self, content: torch.Tensor, table: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """Each block of `content`'s rows times its window of `table`'s: (heads, blocks, batch x T, width)."""
        heads, batch, length, size = content.shape
        blocks, width = windows.shape
        padded = blocks * self.block
        if padded > length:
            content = F.pad(content, (0, 0, 0, padded - length))
        blocked = content.view(heads, batch, blocks, self.block, size).transpose(1, 2)
        rows = table.index_select(1, windows.reshape(-1)).view(heads, blocks, width, size)
        return torch.matmul(blocked.reshape(heads, blocks, batch * self.block, size), rows.transpose(2, 3))

    @classmethod
    def for_length(cls, slot_table: torch.Tensor, max_positions: int, length: int) -> RelativeIndex:
        """The windows of a length-L batch, from the slot of every distance (`relative_slot_table`, indexed
        by distance + max_positions - 1). Padded positions past L reach further; their distances are clamped
        to the table, and their terms never read."""
        blocks = -(-length // RELATIVE_BLOCK)
        block = -(-length // blocks)
        device = slot_table.device
        ends = torch.arange(blocks, device=device)[:, None] * block + (block - 1)

        def slots(distances: torch.Tensor) -> torch.Tensor:
            return slot_table[(distances + max_positions - 1).clamp(0, slot_table.shape[0] - 1)]

        def width(distances: int) -> int:
            return -(-distances // WINDOW_ALIGNMENT) * WINDOW_ALIGNMENT

        reach = length + fused_attention.PACKED_SLOT_REACH
        return cls(
            block,
            slots(ends - torch.arange(width(length + block - 1), device=device)),
            slots(torch.arange(width(blocks * block + block - 1), device=device) - ends),
            slots(-torch.arange(length, device=device)),
            slots(-torch.arange(-reach, reach + 1, device=device)).int(),
        )

    def first_query(self) -> FirstQueryRelativeIndex:
        """The slots of the first query's relative terms: distances 0 down to -(L - 1)."""
        return FirstQueryRelativeIndex(self.first_query_slots)


@dataclass(frozen=True)
class FirstQueryRelativeIndex:
    """`RelativeIndex` for a single query, the first token, against L keys: the terms come out as
    (heads, pair, 1, L), so the last layer attends from the first token alone. Both terms of (0, j) use the
    slot of the distance 0 - j."""

    slots: torch.Tensor  # slot of the distance -j, for key j

    def attention_bias(
        self,
        key_mask_bias: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        projections: RelativeProjections,
    ) -> torch.Tensor:
        """The key mask plus the first query's c2p and p2c terms, (heads, batch, 1, L)."""
        bias = key_mask_bias.expand(query.shape[0], query.shape[1], 1, key.shape[2])
        if projections.keys is not None:
            bias = projections.step(bias + self.c2p(projections.keys, query))
        if projections.queries is not None:
            bias = projections.step(bias + self.p2c(projections.queries, key))
        return bias

    def c2p(self, relative_keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """query_0 . key_table[slot(-j)] for every (head, pair, j), from a (heads, batch, 1, size) query."""
        rows = relative_keys.index_select(1, self.slots)
        return torch.matmul(query, rows.transpose(1, 2).unsqueeze(1))

    def p2c(self, relative_queries: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """key_j . query_table[slot(-j)] for every (head, pair, j): one table row per key, so a product
        summed in float32 (as a matmul would accumulate) rather than a matmul."""
        rows = relative_queries.index_select(1, self.slots).unsqueeze(1)
        return (key.float() * rows.float()).sum(-1, keepdim=True).transpose(-1, -2).to(key.dtype)
