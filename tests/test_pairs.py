"""Pair building: truncation exactly like the tokenizer's own, truncation options, and chunk windows."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from rerankd.engine.tokenize import InputTooLongError, PairOptions, PairTokenizer, longest_first

CLS, SEP = 1, 2


@pytest.fixture(scope="module")
def tokenizer_file(shared_tokenizer_dir: Path) -> Path:
    return shared_tokenizer_dir / "tokenizer.json"


def pairs(tokenizer_file: Path, max_length: int) -> PairTokenizer:
    return PairTokenizer(Tokenizer.from_file(str(tokenizer_file)), max_length)


def plain_ids(tokenizer_file: Path, text: str) -> list[int]:
    return Tokenizer.from_file(str(tokenizer_file)).encode(text, add_special_tokens=False).ids


@pytest.mark.slow
def test_longest_first_equals_the_tokenizers_own_truncation(tokenizer_file: Path, msmarco_dir: Path) -> None:
    """Random (query, document) lengths around each limit, odd and even budgets, against `tokenizers`."""
    with (msmarco_dir / "corpus.jsonl").open() as corpus:
        words = " ".join(json.loads(line)["text"] for line in itertools.islice(corpus, 200)).split()
    rng = random.Random(0)
    reference = Tokenizer.from_file(str(tokenizer_file))
    for max_length in (6, 7, 20, 21, 64, 65, 512):
        built = pairs(tokenizer_file, max_length)
        reference.enable_truncation(max_length, strategy="longest_first")
        for _ in range(60):
            query = " ".join(rng.choices(words, k=rng.randint(1, 2 * max_length)))
            document = " ".join(rng.choices(words, k=rng.randint(0, 2 * max_length)))
            pair, expected = built.encode_pairs(query, [document]).pairs[0], reference.encode(query, document)
            assert pair.ids == expected.ids
            assert pair.token_type_ids == expected.type_ids


def test_every_msmarco_passage_pairs_as_the_tokenizer_pairs_it(
    tokenizer_file: Path, msmarco_dir: Path
) -> None:
    """Whole passages as they come (mojibake, [UNK]s and all), encoded without offsets outside chunk mode."""
    with (msmarco_dir / "corpus.jsonl").open() as corpus:
        passages = [json.loads(line)["text"] for line in corpus]
    query = "what is the most popular food in switzerland"
    reference = Tokenizer.from_file(str(tokenizer_file))
    reference.enable_truncation(512, strategy="longest_first")
    expected = [encoding.ids for encoding in reference.encode_batch([(query, text) for text in passages])]
    assert pairs(tokenizer_file, 512).encode_pairs(query, passages).input_ids == expected


def test_longest_first_cuts_the_longer_first_then_splits_the_budget() -> None:
    assert longest_first(3, 4, 10) == (3, 4)
    assert longest_first(3, 20, 10) == (3, 7)
    assert longest_first(20, 3, 10) == (7, 3)
    assert longest_first(20, 30, 11) == (5, 6)
    assert longest_first(30, 20, 11) == (6, 5)


def test_left_truncation_keeps_the_end_and_max_tokens_per_doc_caps_first(tokenizer_file: Path) -> None:
    document = " ".join(f"w{index}" for index in range(300))
    document_ids = plain_ids(tokenizer_file, document)
    query_ids = plain_ids(tokenizer_file, "query")
    built = pairs(tokenizer_file, 64)
    room = 64 - 3 - len(query_ids)
    right = built.encode("query", [document]).documents[0]
    left = built.encode("query", [document], PairOptions(truncation_direction="left")).documents[0]
    assert right.windows[0].pair.ids == [CLS, *query_ids, SEP, *document_ids[:room], SEP]
    assert left.windows[0].pair.ids == [CLS, *query_ids, SEP, *document_ids[-room:], SEP]
    assert right.truncated and left.truncated
    assert left.windows[0].span is None  # only chunk mode reports spans
    capped = built.encode("query", [document], PairOptions(max_tokens_per_doc=10)).documents[0]
    assert capped.windows[0].pair.ids == [CLS, *query_ids, SEP, *document_ids[:10], SEP]


def test_truncation_off_refuses_an_over_long_pair_naming_the_document(tokenizer_file: Path) -> None:
    built = pairs(tokenizer_file, 64)
    fits = built.encode("query", ["short", "also short"], PairOptions(truncate=False))
    assert [document.truncated for document in fits.documents] == [False, False]
    with pytest.raises(InputTooLongError) as raised:
        built.encode("query", ["short", "word " * 100], PairOptions(truncate=False))
    assert raised.value.index == 1
    assert "more than the model's 64" in str(raised.value)


def test_chunk_windows_cover_the_document_with_overlap(tokenizer_file: Path) -> None:
    document = " ".join(f"w{index}" for index in range(2000))
    document_ids = plain_ids(tokenizer_file, document)
    query_ids = plain_ids(tokenizer_file, "query")
    built = pairs(tokenizer_file, 128)
    room = 128 - 3 - len(query_ids)
    encoded = built.encode("query", [document, "short"], PairOptions(chunk=True, chunk_overlap=16))
    long_document, short_document = encoded.documents
    assert len(short_document.windows) == 1 and not short_document.truncated
    pieces = [window.pair.ids[2 + len(query_ids) : -1] for window in long_document.windows]
    assert all(
        window.pair.ids[: 2 + len(query_ids)] == [CLS, *query_ids, SEP] for window in long_document.windows
    )
    assert all(len(piece) == room for piece in pieces[:-1])
    step = room - 16
    assert all(piece == document_ids[i * step : i * step + room] for i, piece in enumerate(pieces))
    assert pieces[-1][-1] == document_ids[-1]
    assert not long_document.truncated
    assert long_document.windows[0].span[0] == 0 and long_document.windows[-1].span[1] == len(document)
    spans = [window.span for window in long_document.windows]
    assert all(start < previous_end < end for (_, previous_end), (start, end) in itertools.pairwise(spans))
    capped = built.encode("query", [document], PairOptions(chunk=True, max_chunks_per_doc=3)).documents[0]
    assert len(capped.windows) == 3 and capped.truncated


def test_chunk_mode_truncates_a_long_query_to_half_and_says_so(tokenizer_file: Path) -> None:
    built = pairs(tokenizer_file, 128)
    encoded = built.encode("query " * 200, ["document " * 500], PairOptions(chunk=True))
    assert encoded.query_truncated
    first = encoded.documents[0].windows[0].pair.ids
    assert first.index(SEP) - 1 == (128 - 3) // 2
    assert not built.encode("short query", ["document " * 500], PairOptions(chunk=True)).query_truncated
    assert built.encode("query " * 200, ["document " * 500]).query_truncated
