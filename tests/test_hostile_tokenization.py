"""Tokenization bounded by what a request uses: a long text is cut, at a whitespace, to about the characters
its pairs can take before it is tokenized, and the cut changes no token the pairs use, for every tokenizer
kind."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from rerankd.devtools.random_encoders import BPE, UNIGRAM, WORDPIECE, train_family_tokenizer
from rerankd.engine.tokenize import (
    PairOptions,
    PairTokenizer,
    TruncationDirection,
    text_part,
)

pytestmark = [pytest.mark.hostile]


@pytest.fixture(scope="module")
def tokenizers(shared_tokenizer_dir: Path) -> dict[str, Tokenizer]:
    """DeBERTa-v3's real SentencePiece tokenizer, and WordPiece, Unigram and byte-level BPE ones trained here
    (BERT's, XLM-R's and RoBERTa's kinds), each with its pair template."""
    trained = {
        name: train_family_tokenizer(kind, 3000)
        for name, kind in {"wordpiece": WORDPIECE, "unigram": UNIGRAM, "bpe": BPE}.items()
    }
    return {"deberta-v3": Tokenizer.from_file(str(shared_tokenizer_dir / "tokenizer.json")), **trained}


@pytest.fixture(scope="module")
def long_texts(msmarco_dir: Path) -> list[str]:
    """Documents of 20,000 to 60,000 characters: MS MARCO passages run together, with the whitespace runs
    and the hard cases of scraped text."""
    with (msmarco_dir / "corpus.jsonl").open() as corpus:
        passages = [json.loads(line)["text"] for line in itertools.islice(corpus, 600)]
    prose = " ".join(passages)
    return [
        prose[:20_000],
        prose[5_000:65_000],
        "\n\n   \t".join(passages[:300]),  # runs of mixed whitespace between passages
        " " * 30_000 + prose[:20_000],  # a blank start: the cut part must grow past it
        prose[:3_000] + " " * 40_000 + prose[3_000:20_000],  # tokens on both sides of a blank middle
        "\ufdfa" * 50_000,  # one character, many tokens: the reported request
        "x" * 40_000,  # no whitespace at all: cut inside the one word
    ]


@pytest.mark.parametrize("direction", ["right", "left"])
def test_the_part_tokenized_gives_the_tokens_of_the_whole_text_there(
    tokenizers: dict[str, Tokenizer], long_texts: list[str], direction: TruncationDirection
) -> None:
    for name, tokenizer in tokenizers.items():
        for index, text in enumerate(long_texts):
            whole = tokenizer.encode(text, add_special_tokens=False).ids
            chars = 3_000
            while True:  # grown as PairTokenizer grows it, until the part has the tokens a pair needs
                part = text_part(text, chars, direction)
                ids = tokenizer.encode(part.text, add_special_tokens=False).ids
                if not part.cut or len(ids) >= 600:
                    break
                chars *= 4
            kept = whole[: len(ids)] if direction == "right" else whole[len(whole) - len(ids) :]
            if part.cut and not any(character.isspace() for character in text):
                # Cut inside the one word: a SentencePiece unigram may segment all of it otherwise (a
                # documented limit, docs/decisions.md); what is bounded is the cost.
                assert len(ids) >= 600 and len(part.text) < len(text), (name, index)
                continue
            assert ids == kept, f"{name}, text {index}: the cut changed tokens"
            assert part.cut == (len(part.text) < len(text)), (name, index)


@pytest.mark.parametrize("max_length", [64, 512])
def test_pairs_of_long_documents_equal_the_tokenizers_own_truncation(
    tokenizers: dict[str, Tokenizer], long_texts: list[str], max_length: int
) -> None:
    query = "what causes the tides to rise and fall"
    for name, tokenizer in tokenizers.items():
        reference = Tokenizer.from_str(tokenizer.to_str())
        reference.enable_truncation(max_length, strategy="longest_first")
        built = PairTokenizer(Tokenizer.from_str(tokenizer.to_str()), max_length)
        texts = long_texts[:-1]  # the last is one word, cut inside it (see above)
        pairs = built.encode(query, texts).pairs
        expected = reference.encode_batch([(query, text) for text in texts])
        for index, (pair, wanted) in enumerate(zip(pairs, expected, strict=True)):
            assert pair.ids == wanted.ids, f"{name}, document {index}"


def test_chunk_windows_and_their_spans_are_those_of_the_whole_document(
    tokenizers: dict[str, Tokenizer], long_texts: list[str]
) -> None:
    """Three windows of a long document, against its windows when every one is kept (nothing cut)."""
    tokenizer = tokenizers["deberta-v3"]
    built = PairTokenizer(tokenizer, 128)
    every = built.encode("tides", long_texts[:5], PairOptions(chunk=True, max_chunks_per_doc=None))
    three = built.encode("tides", long_texts[:5], PairOptions(chunk=True, max_chunks_per_doc=3))
    for index, (whole, cut) in enumerate(zip(every.documents, three.documents, strict=True)):
        assert [w.pair.ids for w in cut.windows] == [w.pair.ids for w in whole.windows[:3]], index
        assert [w.span for w in cut.windows] == [w.span for w in whole.windows[:3]], index
        assert cut.truncated


def test_a_left_cut_keeps_the_end_and_its_character_spans(tokenizers: dict[str, Tokenizer]) -> None:
    """TEI's `truncation_direction: left` keeps a document's last tokens; they are those of the whole text."""
    tokenizer = tokenizers["deberta-v3"]
    built = PairTokenizer(tokenizer, 64)
    text = " ".join(f"word{number}" for number in range(20_000))
    left = built.encode("q", [text], PairOptions(truncation_direction="left")).pairs[0]
    whole = tokenizer.encode(text, add_special_tokens=False).ids
    document = left.ids[left.ids.index(2) + 1 : -1]  # between the query's [SEP] and the last one
    assert document == whole[len(whole) - len(document) :]


def test_the_reported_body_costs_a_fraction_of_tokenizing_it_whole(tokenizers: dict[str, Tokenizer]) -> None:
    """53 documents of 100,000 x U+FDFA (16 MB of JSON): only what 512-token pairs use is tokenized. Prints
    both times (no bound is asserted on them: the check is the characters actually tokenized)."""
    tokenizer = tokenizers["deberta-v3"]
    documents = ["\ufdfa" * 100_000] * 53
    built = PairTokenizer(Tokenizer.from_str(tokenizer.to_str()), 512)
    started = time.perf_counter()
    pairs = built.encode("a query", documents).pairs
    bounded = time.perf_counter() - started
    assert all(len(pair) == 512 for pair in pairs)
    part = text_part(documents[0], (built.needed_tokens(PairOptions(), 2) + 16) * 6, "right")
    assert len(part.text) < 5_000
    started = time.perf_counter()
    tokenizer.encode_batch_fast(documents[:5], add_special_tokens=False)
    whole = (time.perf_counter() - started) * 53 / 5
    print(f"\n53 x 100k U+FDFA: tokenized in {bounded:.3f} s; whole texts would take about {whole:.1f} s")
