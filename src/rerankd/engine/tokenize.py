"""Pair tokenization: `[CLS] query [SEP] document [SEP]`, truncated longest-first to the model's limit."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer


class PairTokenizer:
    """Encodes (query, document) pairs with the model's own tokenizer; thread-safe (Rust, no shared state).

    Takes the tokenizer over and sets its truncation: a copy of a 128k-piece vocabulary costs ~130 MB.
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length, strategy="longest_first")
        self.max_length = max_length

    def encode_pairs(self, query: str, documents: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch([(query, document) for document in documents])
        return [encoding.ids for encoding in encodings]
