"""Random-weight BERT, ELECTRA, XLM-RoBERTa and ModernBERT cross-encoder folders, for tests and benchmarks.

Each folder is what the Hub holds for such a reranker: config.json (its `architectures`, marked untrained),
model.safetensors written by `transformers` itself, and a tokenizer of the family's kind (WordPiece for
BERT and ELECTRA, a SentencePiece-style unigram for XLM-R, byte-level BPE for ModernBERT) with the family's
pair template, trained offline on Python's own documentation. Geometries are the published models' (from
their cards' config.json), or a tiny one for fast tests.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from rerankd.catalog import UNTRAINED_KEY
from rerankd.devtools.train_tokenizer import training_sentences
from rerankd.modeling.encoders import ENCODER_FAMILIES, reads_token_types

# hidden 64, 2 layers: seconds to build and score, enough to exercise every part of a network.
TINY_GEOMETRY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}


@dataclass(frozen=True)
class TokenizerKind:
    """A family's special tokens (in vocabulary order) and the names its config gives them."""

    specials: tuple[str, ...]
    cls: str
    sep: str
    pad: str
    unk: str
    mask: str


WORDPIECE = TokenizerKind(
    ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"
)
UNIGRAM = TokenizerKind(
    ("<s>", "<pad>", "</s>", "<unk>", "<mask>"), "<s>", "</s>", "<pad>", "<unk>", "<mask>"
)
BPE = TokenizerKind(
    ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"), "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"
)


@dataclass(frozen=True)
class RandomEncoder:
    """A family as a random model is built: its transformers config class's keys and its tokenizer."""

    architecture: str
    model_type: str
    tokenizer: TokenizerKind
    config: Mapping[str, Any]  # keys beyond the geometry and the vocabulary
    published: Mapping[str, int]  # the geometry and vocabulary of its model in ENCODER_FAMILY_MODELS


FAMILIES: dict[str, RandomEncoder] = {
    "bert": RandomEncoder(
        "BertForSequenceClassification",
        "bert",
        WORDPIECE,
        {"type_vocab_size": 2, "max_position_embeddings": 512},
        {
            "hidden_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 12,
            "intermediate_size": 1536,
            "vocab_size": 30522,
        },
    ),
    "electra": RandomEncoder(
        "ElectraForSequenceClassification",
        "electra",
        WORDPIECE,
        {"type_vocab_size": 2, "max_position_embeddings": 512},
        {
            "hidden_size": 768,
            "embedding_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "vocab_size": 30522,
        },
    ),
    "xlm-roberta": RandomEncoder(
        "XLMRobertaForSequenceClassification",
        "xlm-roberta",
        UNIGRAM,
        {
            "type_vocab_size": 1,
            "max_position_embeddings": 514,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
        {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "max_position_embeddings": 8194,
            "vocab_size": 250002,
        },
    ),
    "modernbert": RandomEncoder(
        "ModernBertForSequenceClassification",
        "modernbert",
        BPE,
        {"max_position_embeddings": 8192, "global_attn_every_n_layers": 3, "local_attention": 128},
        {
            "hidden_size": 768,
            "num_hidden_layers": 22,
            "num_attention_heads": 12,
            "intermediate_size": 1152,
            "vocab_size": 50368,
        },
    ),
}


def train_family_tokenizer(kind: TokenizerKind, vocab_size: int) -> Tokenizer:
    """A tokenizer of the family's kind with its pair template: `[CLS] A [SEP] B [SEP]` (B typed 1) for
    BERT's and ModernBERT's, `<s> A </s></s> B </s>` for XLM-R's. Trained once per kind and size."""
    return Tokenizer.from_str(_trained_tokenizer(kind, vocab_size))


@functools.cache
def _trained_tokenizer(kind: TokenizerKind, vocab_size: int) -> str:
    specials = list(kind.specials)
    trainer: trainers.Trainer
    if kind is WORDPIECE:
        tokenizer = Tokenizer(models.WordPiece(unk_token=kind.unk))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    elif kind is UNIGRAM:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=kind.unk)
    else:
        tokenizer = Tokenizer(models.BPE(unk_token=kind.unk))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    tokenizer.train_from_iterator(training_sentences(), trainer)
    cls_id, sep_id = _token_id(tokenizer, kind.cls), _token_id(tokenizer, kind.sep)
    if kind is UNIGRAM:
        tokenizer.post_processor = processors.RobertaProcessing((kind.sep, sep_id), (kind.cls, cls_id))
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{kind.cls}:0 $A:0 {kind.sep}:0",
            pair=f"{kind.cls}:0 $A:0 {kind.sep}:0 $B:1 {kind.sep}:1",
            special_tokens=[(kind.cls, cls_id), (kind.sep, sep_id)],
        )
    return tokenizer.to_str()


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of a special token the trainer was given, so always in the vocabulary."""
    token_id = tokenizer.token_to_id(token)
    assert token_id is not None, token
    return token_id


def randomize_weights(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Every weight of `model` drawn anew, wide enough that every part of the network moves the scores and
    they spread over the sigmoid instead of sitting at sigmoid(0): norm scales around 1, the rest around 0
    with std `scale`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            norm_scale = "norm" in name.lower() and name.endswith(".weight")
            parameter.copy_(1.0 + 0.1 * noise if norm_scale else noise * scale)


def write_random_encoder(
    out_dir: Path,
    family: str,
    published: bool = False,
    seed: int = 0,
    num_labels: int = 1,
    vocab_size: int = 2000,
    scale: float = 0.2,
) -> Path:
    """Write a random-weight `family` cross-encoder folder, tiny or at the published model's geometry;
    returns `out_dir`. The tokenizer has `vocab_size` pieces (the published geometry keeps its own, larger
    embedding table). `scale` is the std of the tiny model's weights; the published geometry keeps
    transformers' own initialization, as deep networks need."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    spec = FAMILIES[family]
    tokenizer = train_family_tokenizer(spec.tokenizer, vocab_size)
    kind = spec.tokenizer
    ids = {token: tokenizer.token_to_id(token) for token in kind.specials}
    keys: dict[str, Any] = {**spec.config, "vocab_size": tokenizer.get_vocab_size()}
    keys.update(spec.published if published else TINY_GEOMETRY)
    keys.update(num_labels=num_labels, pad_token_id=ids[kind.pad])
    if family == "modernbert":
        keys.update(cls_token_id=ids[kind.cls], sep_token_id=ids[kind.sep], bos_token_id=ids[kind.cls])
        keys.update(eos_token_id=ids[kind.sep])
    config = AutoConfig.for_model(spec.model_type, architectures=[spec.architecture], **keys)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    if not published:
        randomize_weights(model, seed, scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    raw = json.loads((out_dir / "config.json").read_text())
    raw[UNTRAINED_KEY] = True
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "cls_token": kind.cls,
        "sep_token": kind.sep,
        "pad_token": kind.pad,
        "unk_token": kind.unk,
        "mask_token": kind.mask,
        "model_max_length": ENCODER_FAMILIES[spec.architecture].max_length(raw),
        # As the published tokenizers (BertTokenizer, ElectraTokenizer) do: transformers' generic fast
        # tokenizer leaves out the segment ids a model with token types reads, unless told to give them.
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]
        if reads_token_types(raw)
        else ["input_ids", "attention_mask"],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out_dir


def write_sentencepiece_xlm_roberta(
    out_dir: Path,
    texts: Iterable[str],
    published: bool = False,
    vocab_size: int = 1000,
    seed: int = 0,
    layers: Mapping[str, int] = TINY_GEOMETRY,
) -> Path:
    """An XLM-R cross-encoder whose tokenizer is a SentencePiece unigram model trained on `texts`, saved as
    the published ones ship it (`sentencepiece.bpe.model` beside tokenizer.json): what llama.cpp's converter
    reads an XLM-R vocabulary from. At the published geometry (its embedding table keeps its 250,002 rows)
    with transformers' initialization, or at `layers` with `randomize_weights`. Returns `out_dir`."""
    import sentencepiece
    from transformers import AutoConfig, AutoModelForSequenceClassification, XLMRobertaTokenizer

    spec = FAMILIES["xlm-roberta"]
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model_file,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sentencepiece.bpe.model").write_bytes(model_file.getvalue())
    tokenizer = XLMRobertaTokenizer.from_pretrained(out_dir)
    keys: dict[str, Any] = {**spec.config, "vocab_size": len(tokenizer), "num_labels": 1}
    keys.update(spec.published if published else layers)
    keys["pad_token_id"] = tokenizer.pad_token_id
    config = AutoConfig.for_model(spec.model_type, architectures=[spec.architecture], **keys)
    # Its pairs truncated where its positions end, as the published tokenizer_config says.
    tokenizer.model_max_length = ENCODER_FAMILIES[spec.architecture].max_length(config.to_dict())
    tokenizer.save_pretrained(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    if not published:
        randomize_weights(model, seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    raw = json.loads((out_dir / "config.json").read_text())
    raw[UNTRAINED_KEY] = True
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return out_dir
