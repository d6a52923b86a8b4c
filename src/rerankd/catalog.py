"""Known reranker models: Hub ids, aliases and geometries.

The geometry table lets tooling (random-weight fixtures, benchmarks) build a model of the
exact published shape without downloading anything.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "mixedbread-ai/mxbai-rerank-base-v1"

# config.json key that marks a random-weight model written for tests and benchmarks.
UNTRAINED_KEY = "rerankd_untrained"


@dataclass(frozen=True)
class Geometry:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class CatalogEntry:
    repo_id: str
    geometry: Geometry
    parameters: str
    fp16_size: str


CATALOG: dict[str, CatalogEntry] = {
    "xsmall": CatalogEntry(
        "mixedbread-ai/mxbai-rerank-xsmall-v1", Geometry(384, 12, 6, 1536), "70M", "142 MB"
    ),
    "base": CatalogEntry("mixedbread-ai/mxbai-rerank-base-v1", Geometry(768, 12, 12, 3072), "184M", "369 MB"),
    "large": CatalogEntry(
        "mixedbread-ai/mxbai-rerank-large-v1", Geometry(1024, 24, 16, 4096), "435M", "870 MB"
    ),
}

# The other encoder families (served by `transformers`' networks), by the name `/info` gives them, and the
# published reranker of each whose geometry random-weight models, tests and benchmarks take.
ENCODER_FAMILY_MODELS: dict[str, str] = {
    "bert": "cross-encoder/ms-marco-MiniLM-L6-v2",
    "electra": "cross-encoder/ms-marco-electra-base",
    "xlm-roberta": "BAAI/bge-reranker-v2-m3",
    "modernbert": "Alibaba-NLP/gte-reranker-modernbert-base",
}

# The LLM rerankers, by family, and the Hub model of each whose geometry random models take.
CAUSAL_FAMILY_MODELS: dict[str, str] = {
    "qwen3-reranker": "Qwen/Qwen3-Reranker-0.6B",
    "mxbai-rerank-v2": "mixedbread-ai/mxbai-rerank-base-v2",
}

# Other names people use for the same weights.
ALIASES: dict[str, str] = {
    "antflydb/mxbai-rerank-base-v1": "mixedbread-ai/mxbai-rerank-base-v1",
}


def canonical_repo_id(model: str) -> str:
    """Map an alias to the Hub repository that holds the safetensors checkpoint."""
    return ALIASES.get(model, model)


def deberta_v3_config(geometry: Geometry, vocab_size: int = 128100) -> dict:
    """A complete DeBERTa-v3 sequence-classification config.json for a geometry (mxbai-rerank keys)."""
    return {
        "architectures": ["DebertaV2ForSequenceClassification"],
        "model_type": "deberta-v2",
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": geometry.hidden_size,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "initializer_range": 0.02,
        "intermediate_size": geometry.intermediate_size,
        "layer_norm_eps": 1e-07,
        "max_position_embeddings": 512,
        "max_relative_positions": -1,
        "norm_rel_ebd": "layer_norm",
        "num_attention_heads": geometry.num_attention_heads,
        "num_hidden_layers": geometry.num_hidden_layers,
        "pad_token_id": 0,
        "pooler_dropout": 0,
        "pooler_hidden_act": "gelu",
        "pooler_hidden_size": geometry.hidden_size,
        "pos_att_type": ["p2c", "c2p"],
        "position_biased_input": False,
        "position_buckets": 256,
        "relative_attention": True,
        "share_att_key": True,
        "torch_dtype": "float16",
        "type_vocab_size": 0,
        "vocab_size": vocab_size,
    }
