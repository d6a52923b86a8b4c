"""Random-weight LLM reranker folders (Qwen3-Reranker, mxbai-rerank-v2), for tests and benchmarks.

Each folder is what the Hub holds: config.json (`Qwen3ForCausalLM` or `Qwen2ForCausalLM`, marked untrained),
model.safetensors written by `transformers`, and a byte-level BPE tokenizer of Qwen's kind (its
pre-tokenizer pattern, NFC, `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, and Qwen3's `<think>` tokens)
trained offline on Python's own documentation. Geometries are the published models' (from their cards'
config.json), or a tiny one for fast tests.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from rerankd.catalog import UNTRAINED_KEY
from rerankd.devtools.random_encoders import randomize_weights
from rerankd.devtools.train_tokenizer import training_sentences
from rerankd.modeling.causal import CAUSAL_FAMILIES

# Qwen2's and Qwen3's pre-tokenizer pattern, from their tokenizer.json.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")

TINY_GEOMETRY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
}

# model_type, then the published geometry (Qwen/Qwen3-Reranker-0.6B, mixedbread-ai/mxbai-rerank-base-v2).
PUBLISHED: dict[str, tuple[str, Mapping[str, Any]]] = {
    "qwen3-reranker": (
        "qwen3",
        {
            "hidden_size": 1024,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 3072,
            "max_position_embeddings": 40960,
            "vocab_size": 151669,
        },
    ),
    "mxbai-rerank-v2": (
        "qwen2",
        {
            "hidden_size": 896,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "intermediate_size": 4864,
            "max_position_embeddings": 32768,
            "vocab_size": 151936,
        },
    ),
}
FAMILY_NAMES = tuple(PUBLISHED)


def train_qwen_tokenizer(vocab_size: int) -> Tokenizer:
    """A Qwen-shaped byte-level BPE tokenizer with every family's answers as tokens; trained once per size."""
    return Tokenizer.from_str(_trained_tokenizer(vocab_size))


@functools.cache
def _trained_tokenizer(vocab_size: int) -> str:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # The answers as replies of their own, so that they are single tokens as in Qwen's vocabulary.
    answers = [spec.prompt.answers for spec in CAUSAL_FAMILIES.values()]
    replies = [answer for pair in answers for answer in pair] * 64
    tokenizer.train_from_iterator([*training_sentences(), *replies], trainer)
    tokenizer.add_tokens([AddedToken(token, normalized=False) for token in THINK_TOKENS])
    return tokenizer.to_str()


def write_random_causal(
    out_dir: Path, family: str, published: bool = False, seed: int = 0, vocab_size: int = 4000
) -> Path:
    """Write a random-weight `family` LLM reranker folder, tiny or at the published model's geometry;
    returns `out_dir`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = next(spec for spec in CAUSAL_FAMILIES.values() if spec.name == family)
    model_type, geometry = PUBLISHED[family]
    tokenizer = train_qwen_tokenizer(vocab_size)
    for answer in spec.prompt.answers:
        if tokenizer.token_to_id(answer) is None:
            raise ValueError(f"the trained vocabulary lacks the answer token {answer!r}")
    pad_id = tokenizer.token_to_id(SPECIALS[0])
    keys: dict[str, Any] = {
        "max_position_embeddings": geometry["max_position_embeddings"],
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "vocab_size": tokenizer.get_vocab_size(),
        "bos_token_id": pad_id,
        "eos_token_id": tokenizer.token_to_id("<|im_end|>"),
        "pad_token_id": pad_id,
    }
    keys.update(geometry if published else TINY_GEOMETRY)
    if not published:
        keys["vocab_size"] = tokenizer.get_vocab_size()
    config = AutoConfig.for_model(model_type, architectures=[spec.architecture], **keys)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if not published:
        randomize_weights(model, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    raw = json.loads((out_dir / "config.json").read_text())
    raw[UNTRAINED_KEY] = True
    # Where the published configs (and transformers 4.x, which the mxbai-rerank reference runs on) keep it.
    raw["rope_theta"] = raw["rope_parameters"]["rope_theta"]
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": SPECIALS[0],
        "eos_token": "<|im_end|>",
        "model_max_length": geometry["max_position_embeddings"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out_dir
