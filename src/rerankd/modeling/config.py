"""DeBERTa-v2/v3 configuration: what the checkpoint's config.json says, checked against what we can run.

Everything the network cannot compute faithfully is refused here, at load, with a message that names the
key, so a model never serves wrong scores silently. `check_config_sizes` holds every family's config (and a
GGUF's) to the sizes its checkpoint can back, before any of them allocates.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "tanh", "silu", "swish")
SUPPORTED_POSITION_ATTENTION = ("c2p", "p2c")
# Config keys (of every family rerankd serves) that size a tensor: each is a dimension of some tensor the
# checkpoint holds, so a value past the checkpoint's largest dimension describes weights that are not there.
TENSOR_SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "embedding_size",
    "pooler_hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "attention_head_size",
    "type_vocab_size",
    "position_buckets",
)
# Positions have no tensor in relative-position and rotary models, yet DeBERTa builds its relative-index table
# over all of them (about 100 bytes a position while it is built); the longest context published (1,010,000
# positions, Qwen2.5-1M) fits under this bound.
POSITION_KEYS = ("max_position_embeddings", "max_relative_positions")
MAX_POSITIONS = 1 << 20


class UnsupportedModelError(ValueError):
    """The checkpoint asks for something this network does not implement."""


def check_config_sizes(raw: Mapping[str, Any], shapes: Collection[Sequence[int]]) -> None:
    """Refuse a model config whose sizes its checkpoint (the tensors' `shapes`, read from the file headers)
    cannot back, before anything is allocated from them: a config.json with 1e8 positions cost a DeBERTa
    load 10.9 GB and 75 s, and 1e5 layers kept the loader building a network for minutes."""
    largest = max((size for shape in shapes for size in shape), default=0)
    for key in TENSOR_SIZE_KEYS:
        _refuse_past(raw, key, largest, f"larger than any dimension of the checkpoint's tensors ({largest})")
    for key in POSITION_KEYS:
        _refuse_past(raw, key, MAX_POSITIONS, f"more than the {MAX_POSITIONS} positions rerankd allows")
    tensors = len(shapes)
    _refuse_past(raw, "num_hidden_layers", tensors, f"more layers than the checkpoint's {tensors} tensors")


def _refuse_past(raw: Mapping[str, Any], key: str, bound: int, why: str) -> None:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return  # absent, or not a number: the family's own config reading refuses what it cannot use
    if not value <= bound:  # NaN too
        raise UnsupportedModelError(
            f"the model config's {key} is {value}, {why}: the config is broken; refused before allocating "
            "for it"
        )


@dataclass(frozen=True)
class DebertaConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    attention_head_size: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    max_position_embeddings: int
    relative_attention: bool
    position_buckets: int
    max_relative_positions: int
    pos_att_type: tuple[str, ...]
    share_att_key: bool
    norm_rel_embeddings: bool
    position_biased_input: bool
    embedding_size: int
    pooler_hidden_size: int
    pooler_hidden_act: str
    num_labels: int
    pad_token_id: int

    @property
    def relative_span(self) -> int:
        """Half the number of relative-position slots (256 for DeBERTa-v3)."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    @property
    def attention_scale_factor(self) -> int:
        """Scores are divided by sqrt(head_size * (1 + number of position terms)).

        The reference counts `pos_att_type` even when `relative_attention` is off, and so do we.
        """
        return 1 + len(self.pos_att_type)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DebertaConfig:
        model_type = raw.get("model_type")
        if model_type != "deberta-v2":
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported: "
                "rerankd runs DeBERTa-v2/v3 ('deberta-v2') checkpoints"
            )
        architectures = raw.get("architectures") or ["DebertaV2ForSequenceClassification"]
        if "DebertaV2ForSequenceClassification" not in architectures:
            raise UnsupportedModelError(
                f"architectures {architectures} has no DebertaV2ForSequenceClassification: "
                "a reranker needs a sequence-classification head"
            )
        if int(raw.get("conv_kernel_size", 0) or 0) > 0:
            raise UnsupportedModelError(
                "conv_kernel_size > 0 (the DeBERTa-v2 convolution layer) is not supported"
            )
        if int(raw.get("type_vocab_size", 0) or 0) > 0:
            raise UnsupportedModelError("type_vocab_size > 0 (token type embeddings) is not supported")
        if int(raw.get("z_steps", 0) or 0) > 0:
            raise UnsupportedModelError("z_steps > 0 is not supported")

        hidden_size = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        if hidden_size % heads != 0 and "attention_head_size" not in raw:
            raise UnsupportedModelError(
                f"hidden_size {hidden_size} is not a multiple of num_attention_heads {heads}"
            )

        pos_att_type = _parse_pos_att_type(raw.get("pos_att_type"))
        hidden_act = _activation(raw, "hidden_act", "gelu")
        pooler_act = _activation(raw, "pooler_hidden_act", "gelu")
        num_labels = _num_labels(raw)

        max_positions = int(raw.get("max_position_embeddings", 512))
        max_relative = int(raw.get("max_relative_positions", -1))
        if max_relative < 1:
            max_relative = max_positions
        norm_rel = [part.strip() for part in str(raw.get("norm_rel_ebd", "none")).lower().split("|")]
        unknown_norm = [part for part in norm_rel if part not in ("none", "layer_norm")]
        if unknown_norm:
            raise UnsupportedModelError(f"norm_rel_ebd {raw.get('norm_rel_ebd')!r} is not supported")

        relative_attention = bool(raw.get("relative_attention", False))
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden_size,
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            attention_head_size=int(raw.get("attention_head_size", hidden_size // heads)),
            intermediate_size=int(raw["intermediate_size"]),
            hidden_act=hidden_act,
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-7)),
            max_position_embeddings=max_positions,
            relative_attention=relative_attention,
            position_buckets=int(raw.get("position_buckets", -1)),
            max_relative_positions=max_relative,
            pos_att_type=pos_att_type,
            share_att_key=bool(raw.get("share_att_key", False)),
            norm_rel_embeddings="layer_norm" in norm_rel,
            position_biased_input=bool(raw.get("position_biased_input", True)),
            embedding_size=int(raw.get("embedding_size") or hidden_size),
            pooler_hidden_size=int(raw.get("pooler_hidden_size", hidden_size)),
            pooler_hidden_act=pooler_act,
            num_labels=num_labels,
            pad_token_id=int(raw.get("pad_token_id", 0)),
        )


def _parse_pos_att_type(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.lower().split("|") if isinstance(value, str) else [str(item).lower() for item in value]
    items = [item.strip() for item in items if item.strip()]
    unknown = [item for item in items if item not in SUPPORTED_POSITION_ATTENTION]
    if unknown:
        raise UnsupportedModelError(
            f"pos_att_type {unknown} is not supported (supported: {list(SUPPORTED_POSITION_ATTENTION)})"
        )
    return tuple(dict.fromkeys(items))


def _activation(raw: Mapping[str, Any], key: str, default: str) -> str:
    name = raw.get(key, default)
    if name not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(
            f"{key} {name!r} is not supported (supported: {list(SUPPORTED_ACTIVATIONS)})"
        )
    return str(name)


def _num_labels(raw: Mapping[str, Any]) -> int:
    labels = len(raw["id2label"]) if raw.get("id2label") else int(raw.get("num_labels", 2))
    if labels not in (1, 2):
        raise UnsupportedModelError(
            f"the classifier has {labels} labels: a reranker needs 1 (score = sigmoid(logit)) "
            "or 2 (score = probability of label 1)"
        )
    return labels
