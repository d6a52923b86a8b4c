"""The Antfly Inference GGUF layout for DeBERTa-v3 rerankers, in one place.

llama.cpp has no DeBERTa architecture, so these files follow Antfly's own conventions: a `deberta`
architecture with nine `deberta.*` keys, the Hugging Face tensor names without their `deberta.`
prefix, and a SentencePiece unigram vocabulary under `tokenizer.ggml.*`. The writer and the reader
both take every name, default and policy from here, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from gguf import GGMLQuantizationType, Keys
from gguf.constants import GGML_QUANT_SIZES

from rerankd.modeling.config import DebertaConfig

ARCHITECTURE = "deberta"
ALIGNMENT = 32
# Antfly names the SentencePiece unigram vocabulary "bert"; the scores make it a unigram model.
TOKENIZER_MODEL = "bert"
# llama.cpp's key for SentencePiece's normalization table; Antfly's files do not carry it.
PRECOMPILED_CHARSMAP_KEY = Keys.Tokenizer.PRECOMPILED_CHARSMAP
HF_PREFIX = "deberta."

# Metadata key -> the config.json key (and DebertaConfig field) it stores; config_from_metadata turns
# num_labels into id2label.
LABEL_COUNT_KEY = f"{ARCHITECTURE}.label_count"
LAYER_NORM_EPSILON_KEY = f"{ARCHITECTURE}.layer_norm_epsilon"
CONFIG_KEYS: dict[str, str] = {
    f"{ARCHITECTURE}.vocab_size": "vocab_size",
    f"{ARCHITECTURE}.embedding_length": "hidden_size",
    f"{ARCHITECTURE}.block_count": "num_hidden_layers",
    f"{ARCHITECTURE}.attention.head_count": "num_attention_heads",
    f"{ARCHITECTURE}.feed_forward_length": "intermediate_size",
    f"{ARCHITECTURE}.context_length": "max_position_embeddings",
    f"{ARCHITECTURE}.position_buckets": "position_buckets",
    LABEL_COUNT_KEY: "num_labels",
    LAYER_NORM_EPSILON_KEY: "layer_norm_eps",
}

# What the format does not store: every DeBERTa-v3 checkpoint has these values.
V3_DEFAULTS: dict[str, Any] = {
    "model_type": "deberta-v2",
    "architectures": ["DebertaV2ForSequenceClassification"],
    "hidden_act": "gelu",
    "pooler_hidden_act": "gelu",
    "relative_attention": True,
    "max_relative_positions": -1,
    "share_att_key": True,
    "pos_att_type": ["p2c", "c2p"],
    "norm_rel_ebd": "layer_norm",
    "position_biased_input": False,
    "type_vocab_size": 0,
}

# Export types by their command-line name; files and reports use the type's own name (Q8_0, ...).
EXPORT_TYPES: dict[str, GGMLQuantizationType] = {
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_k": GGMLQuantizationType.Q4_K,
    "f16": GGMLQuantizationType.F16,
    "f32": GGMLQuantizationType.F32,
}
QUANTIZED_TYPES = (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_K)
# The published Q8_0 keeps the word embeddings dense F16 (a third of the base model); its Q4_K does not.
DEFAULT_KEEP: dict[str, tuple[str, ...]] = {"q8_0": ("embeddings.word_embeddings",), "q4_k": ()}

_VARIANT_FILE = re.compile(r"^(?P<model>.+)[.-](?P<type>q8_0|q4_k|f16|f32)\.gguf$", re.IGNORECASE)


def gguf_tensor_name(hf_name: str) -> str:
    """The GGUF name of a Hugging Face tensor: the same name without the `deberta.` prefix."""
    return hf_name.removeprefix(HF_PREFIX)


def config_from_metadata(values: Mapping[str, Any], pad_token_id: int = 0) -> dict[str, Any]:
    """An HF config.json dict from the `deberta.*` values (keyed by metadata key) and the v3 defaults."""
    config: dict[str, Any] = dict(V3_DEFAULTS)
    for key, config_key in CONFIG_KEYS.items():
        config[config_key] = values[key]
    config["layer_norm_eps"] = float(config["layer_norm_eps"])
    num_labels = int(config.pop("num_labels"))
    config["id2label"] = {str(index): f"LABEL_{index}" for index in range(num_labels)}
    config["label2id"] = {f"LABEL_{index}": index for index in range(num_labels)}
    config["pooler_hidden_size"] = config["hidden_size"]
    config["pad_token_id"] = pad_token_id
    return config


def metadata_from_config(config: DebertaConfig) -> dict[str, int | float]:
    """The `deberta.*` values for a parsed config (keyed by metadata key)."""
    return {key: getattr(config, name) for key, name in CONFIG_KEYS.items()}


def expected_tensor_shapes(config: DebertaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor `load_reranker` reads for `config`, by GGUF name, with its torch-order shape."""
    hidden, embed = config.hidden_size, config.embedding_size
    inner = config.num_attention_heads * config.attention_head_size
    pooler = config.pooler_hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (config.vocab_size, embed),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
        "pooler.dense.weight": (pooler, pooler),
        "pooler.dense.bias": (pooler,),
        "classifier.weight": (config.num_labels, pooler),
        "classifier.bias": (config.num_labels,),
    }
    if config.position_biased_input:
        shapes["embeddings.position_embeddings.weight"] = (config.max_position_embeddings, embed)
    if embed != hidden:
        shapes["embeddings.embed_proj.weight"] = (hidden, embed)
    if config.relative_attention:
        shapes["encoder.rel_embeddings.weight"] = (2 * config.relative_span, hidden)
        if config.norm_rel_embeddings:
            shapes["encoder.LayerNorm.weight"] = (hidden,)
            shapes["encoder.LayerNorm.bias"] = (hidden,)
    linears = {
        "attention.self.query_proj": (inner, hidden),
        "attention.self.key_proj": (inner, hidden),
        "attention.self.value_proj": (inner, hidden),
        "attention.output.dense": (hidden, inner),
        "intermediate.dense": (config.intermediate_size, hidden),
        "output.dense": (hidden, config.intermediate_size),
    }
    if config.relative_attention and not config.share_att_key:
        if "c2p" in config.pos_att_type:
            linears["attention.self.pos_key_proj"] = (inner, hidden)
        if "p2c" in config.pos_att_type:
            linears["attention.self.pos_query_proj"] = (inner, hidden)
    for index in range(config.num_hidden_layers):
        prefix = f"encoder.layer.{index}"
        for name, shape in linears.items():
            shapes[f"{prefix}.{name}.weight"] = shape
            shapes[f"{prefix}.{name}.bias"] = (shape[0],)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{prefix}.{norm}.weight"] = (hidden,)
            shapes[f"{prefix}.{norm}.bias"] = (hidden,)
    return shapes


def stored_type(
    name: str,
    shape: Sequence[int],
    source: GGMLQuantizationType,
    target: GGMLQuantizationType,
    keep: Sequence[str],
) -> GGMLQuantizationType:
    """The type a tensor is stored as in a `target` file, given its torch-order shape and source type.

    F32 files are F32 throughout. Otherwise a float matrix takes the target type when its rows split
    into whole blocks of it and no `keep` prefix names it, and F16 when not (so the published Q8_0
    keeps its word embeddings F16, as llama.cpp falls back to F16); vectors (biases, LayerNorms) keep
    the source type.
    """
    if target == GGMLQuantizationType.F32:
        return target
    if len(shape) < 2:
        return source
    block_size = GGML_QUANT_SIZES[target][0]
    if shape[-1] % block_size == 0 and not name.startswith(tuple(keep)):
        return target
    return GGMLQuantizationType.F16


def tensor_nbytes(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    """Bytes a tensor of this shape takes when stored as `qtype`."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    elements = 1
    for dimension in shape:
        elements *= dimension
    return elements // block_size * type_size


def variant_file_name(model: str, export_type: str) -> str:
    """`<model>.<Q8_0|Q4_K|F16|F32>.gguf`, the name a folder of variants uses for each type."""
    return f"{model}.{EXPORT_TYPES[export_type].name}.gguf"


def parse_variant_file_name(file_name: str) -> tuple[str, str] | None:
    """(model, TYPE) for a variant file name, else None. Accepts Antfly's `<model>-q8_0.gguf` too."""
    match = _VARIANT_FILE.match(file_name)
    if match is None:
        return None
    return match["model"], match["type"].upper()
