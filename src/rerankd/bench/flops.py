"""Floating-point operations a network spends on one (query, document) pair: speed vs the hardware.

Counted like `torch.utils.flop_counter` (2·M·N·K per matrix product; element-wise work ignored):
dense layers, attention itself (QKᵀ and the weighted sum of V, 4·L²·inner per layer) and, for DeBERTa, the
c2p/p2c products over the relative slots a pair of length L reaches. A BERT encoder is the same without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class EncoderShape:
    """What the dense and attention products of a transformer encoder with a pooler depend on."""

    hidden: int
    inner: int  # heads × head size
    intermediate: int
    layers: int
    embedding: int  # an embedding projection when it differs from `hidden`
    pooler: int
    labels: int

    @classmethod
    def of_deberta(cls, config: DebertaConfig) -> EncoderShape:
        return cls(
            config.hidden_size,
            config.num_attention_heads * config.attention_head_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.embedding_size,
            config.pooler_hidden_size,
            config.num_labels,
        )

    @classmethod
    def of_bert(cls, config: Mapping[str, Any]) -> EncoderShape:
        """From a BERT-family `config.json` (the llama.cpp benchmark's model)."""
        hidden = int(config["hidden_size"])
        return cls(
            hidden,
            hidden,
            int(config["intermediate_size"]),
            int(config["num_hidden_layers"]),
            hidden,
            hidden,
            len(config.get("id2label") or {0: "LABEL_0"}),
        )

    def pair_flops(self, length: int) -> PairFlops:
        per_token_layer = self.hidden * 3 * self.inner + self.inner * self.hidden
        per_token_layer += 2 * self.hidden * self.intermediate
        dense = 2 * length * per_token_layer * self.layers
        if self.embedding != self.hidden:
            dense += 2 * length * self.embedding * self.hidden
        dense += 2 * self.pooler * (self.pooler + self.labels)
        return PairFlops(dense, 0, 4 * length * length * self.inner * self.layers)


def relative_slot_count(config: DebertaConfig, length: int) -> int:
    """How many rows of the relative-position table a sequence of `length` tokens reaches."""
    table = relative_slot_table(config).tolist()
    offset = config.max_position_embeddings - 1
    return table[offset + length - 1] - table[offset - (length - 1)] + 1


def pair_flops(config: DebertaConfig, length: int) -> PairFlops:
    encoder = EncoderShape.of_deberta(config).pair_flops(length)
    relative = 0
    if config.relative_attention:
        products = sum(kind in config.pos_att_type for kind in ("c2p", "p2c"))
        relative = (
            2
            * products
            * length
            * relative_slot_count(config, length)
            * config.num_attention_heads
            * config.attention_head_size
            * config.num_hidden_layers
        )
    return PairFlops(encoder.dense, relative, encoder.attention)
