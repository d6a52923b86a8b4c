"""A tiny random-weight BERT cross-encoder, and its GGUF in llama.cpp's own layout, for the llama.cpp backend.

The GGUF is what llama.cpp's `convert_hf_to_gguf.py` writes for a BERT reranker: architecture `bert`,
tensor names from the `gguf` package's BERT name map, the pooler as `cls` and the classifier as
`cls.output` (llama.cpp's rank pooling computes `cls.output(tanh(cls(h_CLS)))`, i.e. BERT's pooler and
classifier), `bert.pooling_type` = RANK, and the WordPiece vocabulary in llama.cpp's "phantom space" form,
which `formats.gguf_wordpiece` writes next to the rebuild the backend reads it with.
The reference `BertForSequenceClassification` comes back with it, so tests can compare scores.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import torch
from tokenizers import Tokenizer, models, processors, trainers

from rerankd.devtools.random_encoders import randomize_weights
from rerankd.formats.gguf_wordpiece import (
    BERT_SPECIAL_TOKENS,
    WORDPIECE_PREFIX,
    add_wordpiece_vocabulary,
    uncased_wordpiece,
)

if TYPE_CHECKING:
    from transformers import BertForSequenceClassification

# Whole words of the vocabulary; anything else is spelled out of single characters and ## continuations.
WORDS = (
    *("the", "a", "an", "of", "to", "in", "is", "was", "by", "and", "or", "for", "on", "with"),
    *("who", "what", "where", "when", "which", "how", "why", "wrote", "write", "written", "novel", "book"),
    *("author", "story", "city", "capital", "country", "river", "paris", "france", "berlin", "germany"),
    *("london", "england", "harper", "lee", "herman", "melville", "jane", "austen", "moby", "dick"),
    *("mockingbird", "kill", "pride", "prejudice", "water", "music", "search", "rank", "score", "query"),
)
PIECES = ("ing", "ed", "s", "er", "est", "ly", "tion")
CONTEXT_LENGTH = 128
# The gguf name map knows a sequence classifier's head under RoBERTa's names.
HEAD_NAMES = {"pooler.dense": "classifier.dense", "classifier": "classifier.out_proj"}
# cross-encoder/ms-marco-MiniLM-L6-v2's shape, the most used BERT reranker: the benchmark's llama.cpp model.
MINILM_L6_GEOMETRY = {
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}
BERT_VOCABULARY_SIZE = 30522


def tiny_bert_vocabulary() -> list[str]:
    """Special tokens, whole words, single characters and `##` continuations: a few hundred entries that
    tokenize any lowercase ASCII text without [UNK]."""
    characters = string.ascii_lowercase + string.digits
    vocabulary = [*BERT_SPECIAL_TOKENS, *WORDS, *characters, *string.punctuation]
    vocabulary += [WORDPIECE_PREFIX + piece for piece in PIECES]
    vocabulary += [WORDPIECE_PREFIX + character for character in characters]
    return list(dict.fromkeys(vocabulary))


def random_bert_cross_encoder(vocabulary: list[str], seed: int = 0) -> BertForSequenceClassification:
    """hidden 64, 2 layers, 4 heads, one label; every weight random (LayerNorms and biases included) and
    wide enough that scores spread over the sigmoid instead of sitting at sigmoid(0)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_dict(
        {
            "vocab_size": len(vocabulary),
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "max_position_embeddings": CONTEXT_LENGTH,
            # Segments A and B, as BERT rerankers (cross-encoder/ms-marco-MiniLM-L6-v2) have.
            "type_vocab_size": 2,
            "num_labels": 1,
            "pad_token_id": vocabulary.index("[PAD]"),
        }
    )
    model = BertForSequenceClassification(config).eval()
    randomize_weights(model, seed)
    with torch.no_grad():
        model.classifier.weight.mul_(2.0)
        model.classifier.bias.zero_()  # logits around 0, where the sigmoid is steepest
    return model


def gguf_tensor_name(hf_name: str, name_map: gguf.TensorNameMap) -> str:
    """llama.cpp's name for a `BertForSequenceClassification` tensor: the pooler is `cls` and the classifier
    `cls.output`, the head llama.cpp's rank pooling applies."""
    stem, _, suffix = hf_name.removeprefix("bert.").rpartition(".")
    mapped = name_map.get_name(HEAD_NAMES.get(stem, stem))
    if mapped is None:
        raise ValueError(f"no llama.cpp name for {hf_name}")
    return f"{mapped}.{suffix}"


def write_bert_gguf(
    model: BertForSequenceClassification,
    vocabulary: list[str],
    path: Path,
    name: str = "tiny random BERT cross-encoder",
) -> Path:
    """Write `model` as an F32 llama.cpp BERT reranker GGUF at `path`."""
    config = model.config
    architecture = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT]
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.RANK)
    writer.add_classifier_output_labels(["LABEL_0"])

    writer.add_token_type_count(config.type_vocab_size)
    add_wordpiece_vocabulary(writer, vocabulary)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("position_ids") or hf_name.endswith("token_type_ids"):
            continue
        writer.add_tensor(gguf_tensor_name(hf_name, name_map), tensor.to(torch.float32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def train_wordpiece(texts: Iterable[str], vocab_size: int = BERT_VOCABULARY_SIZE) -> Tokenizer:
    """An uncased BERT WordPiece tokenizer trained on `texts`, so pairs are as long as a real BERT's, with
    the normalization llama.cpp's WPM applies. Every token has type 0: the model it is for has one type."""
    tokenizer = uncased_wordpiece(
        models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=WORDPIECE_PREFIX)
    )
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BERT_SPECIAL_TOKENS),
        continuing_subword_prefix=WORDPIECE_PREFIX,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:0 [SEP]:0",
        special_tokens=[(token, tokenizer.token_to_id(token)) for token in ("[CLS]", "[SEP]")],
    )
    return tokenizer


def bert_reranker_paths(folder: Path) -> tuple[Path, Path]:
    """Where `write_bert_reranker` puts the transformers folder and the GGUF."""
    return folder / "transformers", folder / "gguf" / "random-bert.F32.gguf"


def write_bert_reranker(
    folder: Path, texts: Iterable[str], geometry: Mapping[str, int] = MINILM_L6_GEOMETRY, seed: int = 0
) -> tuple[Path, Path]:
    """One random-weight BERT reranker twice: a transformers folder (what sentence-transformers loads) and
    the same weights as a llama.cpp GGUF alone in a folder of its own (its tokenizer rebuilt from the
    metadata). Returns (transformers folder, GGUF path)."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = train_wordpiece(texts)
    vocabulary = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    torch.manual_seed(seed)
    config = BertConfig.from_dict(
        {
            "vocab_size": len(vocabulary),
            "type_vocab_size": 1,
            "num_labels": 1,
            "pad_token_id": vocabulary.index("[PAD]"),
            **geometry,
        }
    )
    model = BertForSequenceClassification(config).eval()
    transformers_dir, gguf_path = bert_reranker_paths(folder)
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(transformers_dir)
    tokenizer.save(str(transformers_dir / "tokenizer.json"))
    special = dict(zip(("pad", "unk", "cls", "sep", "mask"), BERT_SPECIAL_TOKENS, strict=True))
    (transformers_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": geometry["max_position_embeddings"],
                **{f"{role}_token": token for role, token in special.items()},
            }
        )
    )
    write_bert_gguf(model, vocabulary, gguf_path, name="random BERT cross-encoder")
    return transformers_dir, gguf_path
