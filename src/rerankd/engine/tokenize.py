"""Pair building: the model's pair template (`[CLS] query [SEP] document [SEP]`, `<s> query </s></s> document
</s>`, ...), or an LLM reranker's prompt (`modeling.causal.Prompt`), around the query and each document,
encoded on their own.

Encoding the texts separately and assembling the pairs here (instead of letting the tokenizer encode pairs)
gives one tokenization per document whatever happens next: truncation exactly like the tokenizer's own
`longest_first` (the reference's), truncation from either end, a per-document token cap, or cutting a long
document into overlapping windows that are each scored with the query (`chunk` mode).

A text is tokenized only as far as its pairs can use: a document of 100,000 characters that yields a 512-token
pair is cut, at a whitespace, to a few thousand characters first (`TextBudget`), and cut less only when that
part yields too few tokens. A character can expand to many tokens (U+FDFA is 18 characters after NFKC), and
the whole text of such a document cost seconds to tokenize for 512 tokens used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tokenizers import Encoding, Tokenizer

from rerankd.backends.base import Batch, Pair
from rerankd.modeling.causal import Prompt
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
    instruction: str | None = None  # an LLM reranker's task instruction (None: its prompt's default)


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

    @classmethod
    def joined(cls, parts: Sequence[EncodedRequest]) -> EncodedRequest:
        """One request of the parts' documents, in order (a request is encoded a slice at a time)."""
        documents = [document for part in parts for document in part.documents]
        return cls(documents, any(part.query_truncated for part in parts))


# A first guess of the characters a needed token takes; a text cut there that yields too few tokens gets
# GROWTH times more characters, until it is whole. English takes about 4 characters a token.
CHARS_PER_TOKEN = 6
GROWTH = 4
# Tokens past the needed ones that the cut part must still yield: room for a word cut where a text has no
# whitespace, and for an LLM reranker's document label.
TOKEN_MARGIN = 16
WHITESPACE = re.compile(r"\s")
THROUGH_LAST_WHITESPACE = re.compile(r".*\s", re.DOTALL)


@dataclass(frozen=True)
class TextPart:
    """The part of a text that is tokenized: where it starts in the text, and whether the rest was cut."""

    text: str
    offset: int
    cut: bool


def text_part(text: str, chars: int | None, direction: TruncationDirection) -> TextPart:
    """`text`, or about `chars` characters of it from the end kept by `direction`, cut at a whitespace so
    that no word is split (a word-local tokenizer then gives the same tokens for the part as the whole text
    gives there): the start ends before a whitespace; the end begins at one, so its first word keeps the
    leading space its tokens carry in the whole text. A text without whitespace there is cut at `chars`."""
    if chars is None or len(text) <= chars:
        return TextPart(text, 0, cut=False)
    if direction == "right":
        through = THROUGH_LAST_WHITESPACE.match(text, 0, chars)
        stop = through.end() - 1 if through is not None and through.end() > 1 else chars
        return TextPart(text[:stop], 0, cut=True)
    start = len(text) - chars
    space = WHITESPACE.search(text, start)
    if space is not None and space.start() < len(text) - 1:
        start = space.start()
    return TextPart(text[start:], start, cut=True)


class InputTooLongError(ValueError):
    def __init__(self, index: int, length: int, max_length: int, at_least: bool = False) -> None:
        tokens = f"at least {length}" if at_least else str(length)
        super().__init__(
            f"the (query, document) pair has {tokens} tokens, more than the model's {max_length} "
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


class InstructionNotTakenError(ValueError):
    """The request gives an instruction, and the model's input has no place for one."""


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

    @classmethod
    def of_prompt(cls, tokenizer: Tokenizer, prompt: Prompt) -> PairTemplate:
        """An LLM reranker's fixed texts, each encoded on its own as its reference does; one token type."""

        def encoded(texts: Sequence[str]) -> list[int]:
            return [token for text in texts for token in tokenizer.encode(text, add_special_tokens=False).ids]

        return cls(encoded(prompt.prefix), encoded(prompt.middle), encoded(prompt.suffix), None, 0)

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
    padding off: every text is encoded whole, and the pairs are cut here. With a `prompt` (an LLM reranker),
    the query text carries the instruction and the document text its label, and a long pair loses document
    tokens first: the query keeps up to three quarters of the room (mxbai-rerank's rule; Qwen3-Reranker's
    card cuts the end of the whole text, which is the same while the query fits), so the prompt and the
    query are never truncated away.
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int, prompt: Prompt | None = None) -> None:
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.max_length = max_length
        self.prompt = prompt
        if prompt is None:
            self.template = PairTemplate.of(tokenizer)
            self._query_tail: list[int] = []
        else:
            self.template = PairTemplate.of_prompt(tokenizer, prompt)
            self._query_tail = self._ids(prompt.query_tail)
        self.budget = max_length - self.template.special_tokens
        if self.budget < 2 or self.budget // 2 <= len(self._query_tail):
            raise ValueError(f"max length {max_length} leaves no room for a query and a document")

    def _ids(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_query(self, query: str, instruction: str | None = None) -> list[int]:
        """The query's tokens (an LLM reranker's: the query text with its instruction). Raises
        `InstructionNotTakenError` for an instruction the model has no place for."""
        if self.prompt is None:
            if instruction is not None:
                raise InstructionNotTakenError("this model takes no instruction (only LLM rerankers do)")
            return self._ids(query)
        return self._ids(self.prompt.query_text(query, instruction))

    def _kept_lengths(self, query: int, document: int) -> tuple[int, int]:
        """Tokens kept of the query and the document when the pair must fit the budget."""
        if self.prompt is None:
            return longest_first(query, document, self.budget)
        kept_query = min(query, self.budget * 3 // 4)
        return kept_query, min(document, self.budget - kept_query)

    def _cut_query(self, query: list[int], keep: int) -> list[int]:
        """The query's first `keep` tokens; a prompt's query text keeps its tail (Qwen3's `<Document>:`)."""
        if keep >= len(query):
            return query
        tail = self._query_tail
        return [*query[: keep - len(tail)], *tail]

    def needed_tokens(self, options: PairOptions, query_tokens: int) -> int | None:
        """A document's tokens that decide its pairs, as `options` ask (None: all of them). Without chunks,
        one past the most a pair takes tells a pair over the limit, and one past the query's length tells
        which of the two `longest_first` cuts first."""
        if options.chunk:
            if options.max_chunks_per_doc is None:
                return None
            return options.max_chunks_per_doc * self.budget
        needed = max(self.budget, query_tokens) + 1
        if options.max_tokens_per_doc is not None:
            needed = min(needed, options.max_tokens_per_doc)
        return needed

    def _encode_parts(
        self, documents: Sequence[str], options: PairOptions, query_tokens: int
    ) -> list[tuple[Encoding, TextPart]]:
        """Each document's tokens, of only as much of it as its pairs can use (`text_part`): a part that
        yields too few tokens grows until it does, or is the whole document."""
        # Only chunk mode reports which characters a window covers. Without it, the variant that keeps no
        # offsets gives the same ids faster (docs/decisions.md).
        encode_batch = self._tokenizer.encode_batch if options.chunk else self._tokenizer.encode_batch_fast
        needed = self.needed_tokens(options, query_tokens)
        chars = None if needed is None else (needed + TOKEN_MARGIN) * CHARS_PER_TOKEN
        encoded: dict[int, tuple[Encoding, TextPart]] = {}
        pending = list(range(len(documents)))
        while pending:
            parts = [text_part(documents[index], chars, options.truncation_direction) for index in pending]
            texts = [
                part.text if self.prompt is None else self.prompt.document_text(part.text) for part in parts
            ]
            short = []
            for index, part, encoding in zip(
                pending, parts, encode_batch(texts, add_special_tokens=False), strict=True
            ):
                if part.cut and needed is not None and len(encoding.ids) < needed + TOKEN_MARGIN:
                    short.append(index)
                else:
                    encoded[index] = (encoding, part)
            pending = short
            chars = None if chars is None else chars * GROWTH
        return [encoded[index] for index in range(len(documents))]

    def encode(
        self, query: str, documents: Sequence[str], options: PairOptions = DEFAULT_PAIR_OPTIONS
    ) -> EncodedRequest:
        """Every document's window(s) with the query, as `options` ask. Raises `InputTooLongError` when
        truncation is off and a pair does not fit."""
        return self.encode_documents(self.encode_query(query, options.instruction), documents, options)

    def encode_documents(
        self,
        query_ids: list[int],
        documents: Sequence[str],
        options: PairOptions = DEFAULT_PAIR_OPTIONS,
        first_index: int = 0,
    ) -> EncodedRequest:
        """`encode` for the query's tokens and a slice of the request's documents, the first of which is
        the request's `first_index`-th (errors name the document by its place in the request)."""
        query_truncated = False
        encoded: list[EncodedDocument] = []
        for index, (encoding, part) in enumerate(
            self._encode_parts(documents, options, len(query_ids)), start=first_index
        ):
            ids = encoding.ids  # each read of `ids` builds a new list
            start, stop = 0, len(ids)
            if options.max_tokens_per_doc is not None and stop > options.max_tokens_per_doc:
                start, stop = self._cut(start, stop, options.max_tokens_per_doc, options.truncation_direction)
            if options.chunk:
                kept_query = min(len(query_ids), self.budget // 2)
                query_kept = self._cut_query(query_ids, kept_query)
                document = self._windows(query_kept, encoding, part, ids, start, stop, options)
            else:
                if not options.truncate and len(query_ids) + stop - start > self.budget:
                    length = self.max_length - self.budget + len(query_ids) + stop - start
                    raise InputTooLongError(index, length, self.max_length, at_least=part.cut)
                kept_query, kept_document = self._kept_lengths(len(query_ids), stop - start)
                start, stop = self._cut(start, stop, kept_document, options.truncation_direction)
                pair = self.template.pair(self._cut_query(query_ids, kept_query), ids[start:stop])
                window = Window(pair, None)
                document = EncodedDocument([window], truncated=part.cut or stop - start < len(ids))
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
        part: TextPart,
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
            span = self._document_span(document, part, window_start, window_stop)
            windows.append(Window(pair, span))
        covered_stop = min(kept[-1] + room, stop)
        truncated = part.cut or start > 0 or covered_stop < len(ids)
        return EncodedDocument(windows, truncated)

    def _document_span(self, document: Encoding, part: TextPart, start: int, stop: int) -> tuple[int, int]:
        """The document's characters tokens start..stop cover (a prompt's document text puts its label
        first; a part cut from a document's end starts `part.offset` characters in)."""
        first, last = _window_span(document, start, stop)
        if self.prompt is not None:
            offset = self.prompt.document_offset
            first, last = max(first - offset, 0), max(last - offset, 0)
        return first + part.offset, last + part.offset

    def encode_pairs(self, query: str, documents: Sequence[str]) -> Batch:
        """One truncated pair per document, as the reference builds them."""
        return Batch(self.encode(query, documents).pairs)
