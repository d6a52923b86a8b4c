"""Floating-point operations the network spends on one (query, document) pair: speed vs the hardware.

Counted like `torch.utils.flop_counter` (2·M·N·K per matrix product; element-wise work ignored):
dense layers, the c2p/p2c products over the relative slots a pair of length L reaches, and attention itself
(QKᵀ and the weighted sum of V, 4·L²·inner per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from rerankd.modeling.config import DebertaConfig
from rerankd.modeling.deberta import relative_slot_table


@dataclass(frozen=True)
class PairFlops:
    dense: int
    relative: int
    attention: int

    @property
    def total(self) -> int:
        return self.dense + self.relative + self.attention


def relative_slot_count(config: DebertaConfig, length: int) -> int:
    """How many rows of the relative-position table a sequence of `length` tokens reaches."""
    table = relative_slot_table(config).tolist()
    offset = config.max_position_embeddings - 1
    return table[offset + length - 1] - table[offset - (length - 1)] + 1


def pair_flops(config: DebertaConfig, length: int) -> PairFlops:
    hidden, inner = config.hidden_size, config.num_attention_heads * config.attention_head_size
    per_token_layer = hidden * 3 * inner + inner * hidden + 2 * hidden * config.intermediate_size
    dense = 2 * length * per_token_layer * config.num_hidden_layers
    if config.embedding_size != hidden:
        dense += 2 * length * config.embedding_size * hidden
    dense += 2 * config.pooler_hidden_size * (config.pooler_hidden_size + config.num_labels)
    relative = 0
    if config.relative_attention:
        products = sum(kind in config.pos_att_type for kind in ("c2p", "p2c"))
        relative = (
            2 * products * length * relative_slot_count(config, length) * inner * config.num_hidden_layers
        )
    attention = 4 * length * length * inner * config.num_hidden_layers
    return PairFlops(dense, relative, attention)
