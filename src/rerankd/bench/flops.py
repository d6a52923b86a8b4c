"""Floating-point operations a network spends on one (query, document) pair: speed vs the hardware.

Counted like `torch.utils.flop_counter` (2·M·N·K per matrix product; element-wise work ignored). DeBERTa
analytically: dense layers, attention itself (QKᵀ and the weighted sum of V, 4·L²·inner per layer) and the
c2p/p2c products over the relative slots a pair of length L reaches. The families `transformers` runs are
counted by torch's counter itself, on the meta device: their network as written, without weights or compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from rerankd.modeling.causal import causal_family
from rerankd.modeling.config import DebertaConfig
from rerankd.modeling.relative import relative_slot_table


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


class CountedFlops:
    """Model FLOPs per pair length of a folder's `transformers` network, as torch's counter sees them, with
    eager attention (every product spelled out). An LLM reranker counts its decoder alone: its head reads two
    answer rows at the last position, nothing beside the layers (the full-vocabulary head the model card
    computes at every position is that code's extra work, not the model's)."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        raw = json.loads((folder / "config.json").read_text())
        config = AutoConfig.from_pretrained(folder, attn_implementation="eager")
        network = AutoModel if causal_family(raw) is not None else AutoModelForSequenceClassification
        with torch.device("meta"):
            self.model = network.from_config(config, attn_implementation="eager").eval()
        self.counted: dict[int, int] = {}

    def __call__(self, length: int) -> int:
        if length not in self.counted:
            # No attention mask: building one reads a meta tensor's values; one unpadded pair needs none.
            ids = torch.zeros((1, length), dtype=torch.long, device="meta")
            with FlopCounterMode(display=False) as counter, torch.inference_mode():
                self.model(input_ids=ids)
            self.counted[length] = counter.get_total_flops()
        return self.counted[length]
