"""A llama.cpp GGUF reranker's tokenizer, and the WordPiece vocabulary llama.cpp stores in GGUF metadata.

llama.cpp keeps WordPiece tokens in "phantom space" form (`▁word` starts a word, a bare piece continues
one, `[X]` is special) under tokenizer model `bert`, which maps one to one onto BERT's `word` / `##piece`
vocabulary. Both directions live here, so they cannot drift apart: the rebuild the llama.cpp backend
tokenizes with, and the writing of such a vocabulary (what llama.cpp's `convert_hf_to_gguf.py` does) for
the random test models.
"""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader, GGUFWriter, Keys, TokenType
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from rerankd.formats.gguf_file import GGUFModelError, metadata_array, metadata_integer, metadata_string
from rerankd.formats.tokenizer import TOKENIZER_JSON

# llama.cpp's tokenizer.ggml.model for a WordPiece vocabulary (its WPM tokenizer).
WORDPIECE_MODEL = "bert"
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PHANTOM_SPACE = "\u2581"
WORDPIECE_PREFIX = "##"


def llamacpp_tokenizer(path: Path, reader: GGUFReader) -> Tokenizer:
    """The model's tokenizer: the `tokenizer.json` beside the file when there is one (exact for every
    family, XLM-RoBERTa's `<s> A </s></s> B </s>` included), else rebuilt from a WordPiece (`bert`)
    vocabulary in the metadata.

    Other vocabularies (SentencePiece, BPE) cannot be rebuilt exactly from the metadata, so they need the
    sidecar. Token ids come out as llama.cpp's, since both index the same vocabulary.
    """
    sidecar = path.parent / TOKENIZER_JSON
    if sidecar.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(sidecar))
        # tokenizers reports every parse failure as a bare Exception.
        except Exception as error:
            raise GGUFModelError(sidecar, f"not a valid tokenizer: {error}") from error
        if tokenizer.post_processor is None:
            raise GGUFModelError(sidecar, "has no post-processor, so it cannot build (query, document) pairs")
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer
    model = metadata_string(path, reader, Keys.Tokenizer.MODEL)
    if model != WORDPIECE_MODEL:
        raise GGUFModelError(
            path,
            f"a {model!r} vocabulary cannot be rebuilt exactly from the GGUF metadata; put the model's "
            f"{TOKENIZER_JSON} next to the file",
        )
    return wordpiece_from_phantom_space(path, reader)


def wordpiece_from_phantom_space(path: Path, reader: GGUFReader) -> Tokenizer:
    """BERT's WordPiece tokenizer from llama.cpp's vocabulary; normalization is uncased BERT's (lowercase,
    accents stripped), as llama.cpp's own WPM tokenizer does. Control and unknown tokens are special."""
    if reader.get_field(Keys.Tokenizer.LIST) is None:
        raise GGUFModelError(path, f"no {Keys.Tokenizer.LIST} and no {TOKENIZER_JSON} beside it")
    vocabulary = [
        _from_phantom_space(token) for token in metadata_array(path, reader, Keys.Tokenizer.LIST, str)
    ]
    special_ids = [
        metadata_integer(path, reader, key)
        for key in (Keys.Tokenizer.BOS_ID, Keys.Tokenizer.SEP_ID, Keys.Tokenizer.UNK_ID)
    ]
    cls_id, sep_id, unk_id = special_ids
    if any(not 0 <= token_id < len(vocabulary) for token_id in special_ids):
        raise GGUFModelError(
            path,
            f"[CLS] (bos), [SEP] and [UNK] ids {cls_id}, {sep_id}, {unk_id} are not all in the "
            f"{len(vocabulary)}-token vocabulary",
        )
    tokenizer = uncased_wordpiece(
        models.WordPiece(
            {token: index for index, token in enumerate(vocabulary)},
            unk_token=vocabulary[unk_id],
            continuing_subword_prefix=WORDPIECE_PREFIX,
        )
    )
    special = {vocabulary[token_id] for token_id in special_ids}
    if reader.get_field(Keys.Tokenizer.TOKEN_TYPE) is not None:
        token_types = metadata_array(path, reader, Keys.Tokenizer.TOKEN_TYPE, int)
        special.update(
            token
            for token, kind in zip(vocabulary, token_types, strict=False)
            if kind in (TokenType.CONTROL, TokenType.UNKNOWN)
        )
    tokenizer.add_special_tokens(sorted(special))
    tokenizer.post_processor = processors.BertProcessing(
        (vocabulary[sep_id], sep_id), (vocabulary[cls_id], cls_id)
    )
    return tokenizer


def uncased_wordpiece(model: models.WordPiece) -> Tokenizer:
    """A tokenizer around `model` that normalizes, splits and decodes as uncased BERT and llama.cpp's WPM."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=WORDPIECE_PREFIX)
    return tokenizer


def add_wordpiece_vocabulary(writer: GGUFWriter, vocabulary: list[str]) -> None:
    """Store a BERT WordPiece `vocabulary` (which holds BERT_SPECIAL_TOKENS) as llama.cpp's converter does:
    phantom-space tokens, [UNK] unknown and the other special tokens control, [CLS] as the BOS id."""
    writer.add_tokenizer_model(WORDPIECE_MODEL)
    writer.add_token_list([_to_phantom_space(token) for token in vocabulary])
    writer.add_token_types(
        [
            TokenType.UNKNOWN
            if token == "[UNK]"
            else TokenType.CONTROL
            if token in BERT_SPECIAL_TOKENS
            else TokenType.NORMAL
            for token in vocabulary
        ]
    )
    writer.add_bos_token_id(vocabulary.index("[CLS]"))  # llama.cpp reads [CLS] as BERT's BOS
    writer.add_sep_token_id(vocabulary.index("[SEP]"))
    writer.add_unk_token_id(vocabulary.index("[UNK]"))
    writer.add_pad_token_id(vocabulary.index("[PAD]"))
    writer.add_mask_token_id(vocabulary.index("[MASK]"))


def _from_phantom_space(token: str) -> str:
    """BERT's form of one of llama.cpp's tokens: `▁word` -> `word`, `piece` -> `##piece`."""
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith(PHANTOM_SPACE):
        return token[len(PHANTOM_SPACE) :]
    return WORDPIECE_PREFIX + token


def _to_phantom_space(token: str) -> str:
    """llama.cpp's form of a BERT token, the inverse of `_from_phantom_space`."""
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith(WORDPIECE_PREFIX):
        return token[len(WORDPIECE_PREFIX) :]
    return PHANTOM_SPACE + token
