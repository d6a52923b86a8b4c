"""Engine: tokenization, batching and scoring end to end against the reference model and tokenizer."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest
import torch
from transformers import DebertaV2ForSequenceClassification, PreTrainedTokenizerFast

from rerankd.engine.engine import DocumentScore
from rerankd.engine.loader import load_engine
from rerankd.engine.postprocess import rank, sigmoid
from rerankd.modeling.onednn import PackedLinear
from rerankd.settings import RuntimeSettings

QUERY = "Who wrote To Kill a Mockingbird?"


def passages(msmarco_dir: Path, count: int) -> list[str]:
    with (msmarco_dir / "corpus.jsonl").open() as corpus:
        return [json.loads(line)["text"] for line in itertools.islice(corpus, count)]


@pytest.fixture(scope="module")
def reference(xsmall_model_dir: Path):
    # In float64: the truth that float32 scores are bounded against, whatever the CPU's kernels round.
    model = DebertaV2ForSequenceClassification.from_pretrained(xsmall_model_dir, dtype=torch.float64).eval()
    # The model's own tokenizer.json is the reference tokenization. (transformers 5's AutoTokenizer rebuilds a
    # DeBERTa-v2 tokenizer with another normalizer, which maps some rare characters differently.)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(xsmall_model_dir / "tokenizer.json"), pad_token="[PAD]"
    )
    return tokenizer, model


def reference_logits(reference, query: str, documents: list[str]) -> list[float]:
    """One unpadded forward per pair: the reference's score of each pair on its own.

    Pairs are passed as lists, as sentence-transformers' CrossEncoder does: transformers drops an empty second
    text of a single pair (`[CLS] q [SEP]`), while a batch keeps it (`[CLS] q [SEP] [SEP]`, like rerankd).
    """
    tokenizer, model = reference
    logits = []
    with torch.inference_mode():
        for document in documents:
            inputs = tokenizer([query], [document], truncation=True, max_length=512, return_tensors="pt")
            logits.append(model(input_ids=inputs["input_ids"]).logits[0, 0].item())
    return logits


@pytest.mark.slow
def test_engine_scores_equal_the_reference_across_split_batches(
    xsmall_model_dir: Path, msmarco_dir: Path, reference
) -> None:
    """Real passages, a long document (truncated) and an empty one; a small token budget forces many batches,
    and every score must still come back in input order."""
    documents = [*passages(msmarco_dir, 40), "", "word " * 2000]
    engine = load_engine(str(xsmall_model_dir), RuntimeSettings(max_batch_tokens=1024, max_batch_pairs=8))
    try:
        scored = asyncio.run(engine.score(QUERY, documents))
    finally:
        engine.close()
    # What a CPU serves: the dense layers run on oneDNN with their weights reordered at load.
    assert any(isinstance(module, PackedLinear) for module in engine.backend.model.modules())
    expected = reference_logits(reference, QUERY, documents)
    assert max(abs(a - b) for a, b in zip(scored.logits, expected, strict=True)) <= 1e-4
    tokenizer = reference[0]
    expected_tokens = sum(
        len(ids)
        for ids in tokenizer([QUERY] * len(documents), documents, truncation=True, max_length=512)[
            "input_ids"
        ]
    )
    assert scored.token_count == expected_tokens


@pytest.mark.parametrize(("query_words", "document_words"), [(5, 1000), (1000, 5), (400, 400), (300, 3)])
def test_truncation_is_longest_first_like_the_reference_tokenizer(
    xsmall_model_dir: Path, reference, query_words: int, document_words: int
) -> None:
    engine = load_engine(str(xsmall_model_dir), RuntimeSettings(max_length=256))
    try:
        ids = engine.tokenizer.encode_pairs("query " * query_words, ["document " * document_words]).input_ids[
            0
        ]
    finally:
        engine.close()
    expected = reference[0](
        "query " * query_words, "document " * document_words, truncation="longest_first", max_length=256
    )["input_ids"]
    assert ids == expected
    assert len(ids) <= 256


def test_max_length_cannot_exceed_the_model(xsmall_model_dir: Path) -> None:
    engine = load_engine(str(xsmall_model_dir), RuntimeSettings(max_length=4096))
    try:
        assert engine.max_length == 512
    finally:
        engine.close()


def scored(*logits: float) -> list[DocumentScore]:
    return [DocumentScore(logit, 0, 1, None, False) for logit in logits]


def test_rank_sorts_by_score_then_index_and_cuts_after_sorting() -> None:
    documents = scored(0.0, 2.0, -1.0, 2.0)
    ranked = rank(documents, top_n=3)
    assert [item.index for item in ranked] == [1, 3, 0]
    assert ranked[0].score == pytest.approx(sigmoid(2.0)) and ranked[0].detail is documents[1]
    assert [item.score for item in rank(scored(0.5, -3.0), raw_scores=True)] == [0.5, -3.0]
    assert len(rank(scored(1.0, 2.0), top_n=10)) == 2


def test_sigmoid_is_stable_at_extremes() -> None:
    assert sigmoid(1000.0) == 1.0
    assert sigmoid(-1000.0) == 0.0
    assert sigmoid(0.0) == 0.5


def test_threads_option_sets_torch_threads(xsmall_model_dir: Path) -> None:
    before = torch.get_num_threads()
    try:
        load_engine(str(xsmall_model_dir), RuntimeSettings(threads=1)).close()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
