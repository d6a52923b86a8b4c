"""Pair building: the model's pair template (`[CLS] query [SEP] document [SEP]`, `<s> query </s></s> document
</s>`, ...) around the query and each document, encoded on their own.

Encoding the texts separately and assembling the pairs here (instead of letting the tokenizer encode pairs)
gives one tokenization per document whatever happens next: truncation exactly like the tokenizer's own
`longest_first` (the reference's), truncation from either end, a per-document token cap, or cutting a long
document into overlapping windows that are each scored with the query (`chunk` mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tokenizers import Encoding, Tokenizer

from rerankd.backends.base import Batch, Pair
from rerankd.settings import DEFAULT_CHUNK_OVERLAP

TruncationDirection = Literal["right", "left"]


@dataclass(frozen=True)
class PairOptions:
    """How a request wants its long inputs handled."""

    truncate: bool = True  # False: a pair over the model's limit is an error (TEI's `truncate: false`)
    truncation_direction: TruncationDirection = "right"  # "left" keeps a document's end instead of its start
    max_tokens_per_doc: int | None = None  # cap on each document's own tokens, applied first
    chunk: bool = False  # score windows of long documents, each document by its best window
    max_chunks_per_doc: int | None = None  # windows past this many are dropped
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP


DEFAULT_PAIR_OPTIONS = PairOptions()


@dataclass(frozen=True)
class Window:
    """One (query, piece of a document) pair, and which characters of the document the piece covers (in
    chunk mode, which reports them; None otherwise)."""

    pair: Pair
    span: tuple[int, int] | None


@dataclass(frozen=True)
class EncodedDocument:
    windows: list[Window]  # one unless the document was chunked
    truncated: bool  # tokens of the document were left out of every window


@dataclass(frozen=True)
class EncodedRequest:
    documents: list[EncodedDocument]
    query_truncated: bool

    @property
    def pairs(self) -> list[Pair]:
        """Every window's pair, documents in order."""
        return [window.pair for document in self.documents for window in document.windows]


class InputTooLongError(ValueError):
    def __init__(self, index: int, length: int, max_length: int) -> None:
        super().__init__(
            f"the (query, document) pair has {length} tokens, more than the model's {max_length} "
            "(allow truncation, or shorten the document)"
        )
        self.index = index


def longest_first(first: int, second: int, budget: int) -> tuple[int, int]:
    """Lengths kept of two sequences under `budget` tokens, exactly as `tokenizers`' `longest_first`: the
    longer one is cut first; when both must be cut, the shorter keeps budget // 2 and the longer the rest."""
    if first + second <= budget:
        return first, second
    shorter, longer = sorted((first, second))
    longer = shorter if shorter > budget else max(shorter, budget - shorter)
    if shorter + longer > budget:
        shorter = budget // 2
        longer = shorter + budget % 2
    return (longer, shorter) if first > second else (shorter, longer)


def _window_span(document: Encoding, start: int, stop: int) -> tuple[int, int]:
    """The characters tokens start..stop cover. `token_to_chars` reads two tokens' offsets, where
    `Encoding.offsets` builds the list of every token's, a real share of the tokenization's time
    (docs/decisions.md)."""
    if start >= stop:
        return 0, 0
    first, last = document.token_to_chars(start), document.token_to_chars(stop - 1)
    if first is None or last is None:  # only special tokens have no characters, and none are added here
        raise ValueError("a document's token has no characters")
    return first[0], last[1]


class UnsupportedTemplateError(ValueError):
    """The tokenizer's pair template gives token types this module cannot reproduce."""


@dataclass(frozen=True)
class PairTemplate:
    """The special tokens a tokenizer's pair template puts before, between and after the two texts, and where
    token type 1 starts: `second_at` tokens into part `second_part` (0 prefix ... 4 suffix); None when the
    template gives every token type 0 (RoBERTa, XLM-R)."""

    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    second_part: int | None
    second_at: int

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> PairTemplate:
        first = tokenizer.encode("a", add_special_tokens=False)
        second = tokenizer.encode("b", add_special_tokens=False)
        pair = tokenizer.post_process(first, second, add_special_tokens=True)
        texts = [at for at, special in enumerate(pair.special_tokens_mask) if not special]
        first_at, second_at = texts[0], texts[len(first.ids)]
        first_end, second_end = first_at + len(first.ids), second_at + len(second.ids)
        bounds = [0, first_at, first_end, second_at, second_end, len(pair.ids)]
        types = pair.type_ids
        if any(kind not in (0, 1) for kind in types) or sorted(types) != types:
            raise UnsupportedTemplateError(f"pair template with token types {types} (expected 0s, then 1s)")
        part, offset = None, 0
        if 1 in types:
            start = types.index(1)
            part = max(index for index in range(5) if bounds[index] <= start)
            offset = start - bounds[part]
            if part < 2:
                raise UnsupportedTemplateError(f"pair template with token type 1 on the first text ({types})")
        ids = pair.ids
        return cls(ids[:first_at], ids[first_end:second_at], ids[second_end:], part, offset)

    @property
    def special_tokens(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    def pair(self, query: list[int], document: list[int]) -> Pair:
        ids = [*self.prefix, *query, *self.middle, *document, *self.suffix]
        lengths = [len(self.prefix), len(query), len(self.middle), len(document), len(self.suffix)]
        second = len(ids) if self.second_part is None else sum(lengths[: self.second_part]) + self.second_at
        return Pair(ids, second)


class PairTokenizer:
    """Builds model inputs for (query, document) pairs with the model's own tokenizer; thread-safe.

    Takes the tokenizer over (copying a large vocabulary costs a lot of memory) and turns its truncation and
    padding off: every text is encoded whole, and the pairs are cut here.
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.max_length = max_length
        self.template = PairTemplate.of(tokenizer)
        self.budget = max_length - self.template.special_tokens
        if self.budget < 2:
            raise ValueError(f"max length {max_length} leaves no room for a query and a document")

    def encode(
        self, query: str, documents: Sequence[str], options: PairOptions = DEFAULT_PAIR_OPTIONS
    ) -> EncodedRequest:
        """Every document's window(s) with the query, as `options` ask. Raises `InputTooLongError` when
        truncation is off and a pair does not fit."""
        query_ids = self._tokenizer.encode(query, add_special_tokens=False).ids
        # Only chunk mode reports which characters a window covers. Without it, the variant that keeps no
        # offsets gives the same ids faster (docs/decisions.md).
        encode_batch = self._tokenizer.encode_batch if options.chunk else self._tokenizer.encode_batch_fast
        encodings = encode_batch(list(documents), add_special_tokens=False)
        query_truncated = False
        encoded: list[EncodedDocument] = []
        for index, encoding in enumerate(encodings):
            ids = encoding.ids  # each read of `ids` builds a new list
            start, stop = 0, len(ids)
            if options.max_tokens_per_doc is not None and stop > options.max_tokens_per_doc:
                start, stop = self._cut(start, stop, options.max_tokens_per_doc, options.truncation_direction)
            if options.chunk:
                kept_query = min(len(query_ids), self.budget // 2)
                document = self._windows(query_ids[:kept_query], encoding, ids, start, stop, options)
            else:
                if not options.truncate and len(query_ids) + stop - start > self.budget:
                    length = self.max_length - self.budget + len(query_ids) + stop - start
                    raise InputTooLongError(index, length, self.max_length)
                kept_query, kept_document = longest_first(len(query_ids), stop - start, self.budget)
                start, stop = self._cut(start, stop, kept_document, options.truncation_direction)
                pair = self.template.pair(query_ids[:kept_query], ids[start:stop])
                window = Window(pair, None)
                document = EncodedDocument([window], truncated=stop - start < len(ids))
            query_truncated |= kept_query < len(query_ids)
            encoded.append(document)
        return EncodedRequest(encoded, query_truncated)

    @staticmethod
    def _cut(start: int, stop: int, keep: int, direction: TruncationDirection) -> tuple[int, int]:
        if stop - start <= keep:
            return start, stop
        return (start, start + keep) if direction == "right" else (stop - keep, stop)

    def _windows(
        self,
        query: list[int],
        document: Encoding,
        ids: list[int],
        start: int,
        stop: int,
        options: PairOptions,
    ) -> EncodedDocument:
        """Windows of `room` tokens, each `room - overlap` after the last, until the end is covered."""
        room = self.budget - len(query)
        step = room - min(options.chunk_overlap, room // 2)
        starts = [start]
        while starts[-1] + room < stop:
            starts.append(starts[-1] + step)
        limit = options.max_chunks_per_doc
        kept = starts if limit is None else starts[:limit]
        windows = []
        for window_start in kept:
            window_stop = min(window_start + room, stop)
            pair = self.template.pair(query, ids[window_start:window_stop])
            windows.append(Window(pair, _window_span(document, window_start, window_stop)))
        covered_stop = min(kept[-1] + room, stop)
        truncated = start > 0 or covered_stop < len(ids)
        return EncodedDocument(windows, truncated)

    def encode_pairs(self, query: str, documents: Sequence[str]) -> Batch:
        """One truncated pair per document, as the reference builds them."""
        return Batch(self.encode(query, documents).pairs)
