"""Rebuild a DeBERTa-v3 GGUF file's tokenizer from its `tokenizer.ggml.*` metadata (a SentencePiece unigram).

A tokenizer.json next to the file (Antfly's model folders carry one) is preferred, since the rebuilt
normalization is exact only with SentencePiece's precompiled table, which Antfly's files lack. Every way the
vocabulary cannot give a tokenizer becomes one GGUFModelError naming the file; gguf_writer writes the
vocabulary this reads.
"""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader, Keys, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, normalizers

from rerankd.formats.gguf_file import GGUFModelError, metadata_array, metadata_integer
from rerankd.formats.gguf_layout import PRECOMPILED_CHARSMAP_KEY
from rerankd.formats.sentencepiece import pair_template, unigram_tokenizer
from rerankd.formats.tokenizer import TOKENIZER_JSON, TokenizerLoadError, load_tokenizer

# With tokenizer.ggml.tokens, scores and token_type, what a tokenizer is rebuilt from.
SPECIAL_ID_KEYS = (Keys.Tokenizer.BOS_ID, Keys.Tokenizer.EOS_ID, Keys.Tokenizer.UNK_ID)
# What SentencePiece's nmt_nfkc table does besides NFKC, found by comparing DeBERTa-v3's table with
# NFKC on every code point: it deletes these control characters...
NMT_DELETED = "[\u0001-\u0008\u000b\u000e-\u001f\u007f\u008f\u009f]"
# ...and turns these separators, invisible marks and U+2581 (the Metaspace marker itself) into spaces.
NMT_SPACES = "[\t\n\u000c\r\u1680\u200b-\u200f\u2028\u2029\u2581\ufeff\ufffd]"


def deberta_tokenizer(path: Path, reader: GGUFReader) -> Tokenizer:
    """The tokenizer.json beside `path`, else the one rebuilt from the file's vocabulary metadata."""
    if (path.parent / TOKENIZER_JSON).is_file():
        try:
            return load_tokenizer(path.parent)
        except TokenizerLoadError as error:
            raise GGUFModelError(path, f"the tokenizer next to it is unusable: {error}") from error
    tokens = metadata_array(path, reader, Keys.Tokenizer.LIST, str)
    scores = [float(score) for score in metadata_array(path, reader, Keys.Tokenizer.SCORES, float)]
    token_types = metadata_array(path, reader, Keys.Tokenizer.TOKEN_TYPE, int)
    if not tokens or len(scores) != len(tokens) or len(token_types) != len(tokens):
        raise GGUFModelError(
            path,
            f"the vocabulary has {len(tokens)} tokens, {len(scores)} scores, {len(token_types)} token types",
        )
    if len(set(scores)) == 1:
        raise GGUFModelError(
            path,
            f"every {Keys.Tokenizer.SCORES} entry is {scores[0]}, so the unigram tokenizer cannot be rebuilt "
            f"from the metadata (Antfly's exporter writes no scores); put the model's {TOKENIZER_JSON} next "
            "to the file",
        )
    bos_id, eos_id, unknown_id = special_ids = [
        metadata_integer(path, reader, key) for key in SPECIAL_ID_KEYS
    ]
    if any(not 0 <= token_id < len(tokens) for token_id in special_ids):
        raise GGUFModelError(path, f"special token ids {special_ids} fall outside the {len(tokens)} tokens")
    charsmap_field = reader.get_field(PRECOMPILED_CHARSMAP_KEY)
    charsmap = bytes(metadata_array(path, reader, PRECOMPILED_CHARSMAP_KEY, int)) if charsmap_field else None
    try:
        return tokenizer_from_vocabulary(
            tokens, scores, token_types, bos_id, eos_id, unknown_id, precompiled_charsmap=charsmap
        )
    # tokenizers reports an invalid vocabulary or charsmap as a bare Exception.
    except Exception as error:
        raise GGUFModelError(path, f"tokenizer.ggml.* does not give a tokenizer: {error}") from error


def tokenizer_from_vocabulary(
    tokens: list[str],
    scores: list[float],
    token_types: list[int],
    bos_id: int,
    eos_id: int,
    unknown_id: int,
    precompiled_charsmap: bytes | None = None,
) -> Tokenizer:
    """A DeBERTa-v3 tokenizer from GGUF vocabulary metadata: unigram pieces and scores, control and
    unknown tokens as special tokens, `[CLS] A [SEP] B [SEP]` pairs.

    With the precompiled charsmap the normalizer is SentencePiece's own; without it NFKC plus the
    nmt_nfkc deletions and space mappings, which agrees with it on every single code point but
    U+FF5E and U+1F23B, though not on some sequences (conjoining Hangul jamo, halfwidth kana with
    sound marks, some stacked combining marks), which NFKC composes and the table does not.
    """
    character_steps: list[normalizers.Normalizer] = (
        [normalizers.Precompiled(precompiled_charsmap)]
        if precompiled_charsmap
        else [
            normalizers.Replace(Regex(NMT_DELETED), ""),
            normalizers.Replace(Regex(NMT_SPACES), " "),
            normalizers.NFKC(),
        ]
    )
    tokenizer = unigram_tokenizer(list(zip(tokens, scores, strict=True)), unknown_id, character_steps)
    tokenizer.add_special_tokens(
        [
            # DeBERTa-v3 marks [UNK] normalized, so "[UNK]" typed in text still matches it.
            AddedToken(tokens[index], normalized=kind == TokenType.UNKNOWN, special=True)
            for index, kind in enumerate(token_types)
            if kind in (TokenType.CONTROL, TokenType.UNKNOWN)
        ]
    )
    tokenizer.post_processor = pair_template(tokens[bos_id], bos_id, tokens[eos_id], eos_id)
    return tokenizer
