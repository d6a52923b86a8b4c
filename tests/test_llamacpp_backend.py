"""The llama.cpp backend: a tiny random BERT cross-encoder written as a llama.cpp GGUF, served by rerankd and
compared with `transformers`' BertForSequenceClassification; backend choice by architecture and by option."""

from __future__ import annotations

import asyncio
import importlib.util
import math
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import pytest
import torch

from rerankd.backends.base import Batch, ModelLoadError, Pair
from rerankd.devtools.random_bert_gguf import random_bert_cross_encoder, tiny_bert_vocabulary, write_bert_gguf
from rerankd.engine.loader import load_engine
from rerankd.formats.gguf_writer import export_gguf
from rerankd.settings import RuntimeSettings, load_settings

from conftest import load_backend_at
from serving import running_server

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)
QUERY = "Who wrote To Kill a Mockingbird?"
DOCUMENTS = [
    "To Kill a Mockingbird is a novel by Harper Lee.",
    "Moby-Dick was written by Herman Melville.",
    "",
    "Jane Austen wrote Pride and Prejudice; the capital of France is Paris. " * 6,
    "Émile wrote 日本 stories, 42 of them!",
    "water",
]
SCORE_TOLERANCE = 1e-3  # sigmoid scores, float32
LOGIT_TOLERANCE = 5e-3  # ggml's GELU and attention round differently from torch's


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """(GGUF path, the reference model, its own tokenizer built by transformers from a vocab.txt)."""
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocabulary = tiny_bert_vocabulary()
    model = random_bert_cross_encoder(vocabulary)
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    reference_tokenizer = BertTokenizer.from_pretrained(folder)
    # The GGUF alone in its folder: the engine's tokenizer is rebuilt from the metadata.
    path = write_bert_gguf(model, vocabulary, tmp_path_factory.mktemp("gguf") / "tiny-bert.F32.gguf")
    return path, model, reference_tokenizer


def reference_ids(tokenizer: Any, documents: list[str]) -> list[list[int]]:
    """`[CLS] query [SEP] document [SEP]` in the model's own ids, the empty document included (transformers'
    pair API drops an empty second text; the engine scores it like any other)."""
    query = tokenizer.encode(QUERY, add_special_tokens=False)
    pairs = [
        [
            tokenizer.cls_token_id,
            *query,
            tokenizer.sep_token_id,
            *tokenizer.encode(document, add_special_tokens=False),
            tokenizer.sep_token_id,
        ]
        for document in documents
    ]
    assert max(map(len, pairs)) <= 128
    return pairs


def reference_logits(model: Any, tokenizer: Any, documents: list[str]) -> list[float]:
    """BertForSequenceClassification on each pair; token types all 0, as llama.cpp feeds them."""
    with torch.no_grad():
        return [
            model(input_ids=torch.tensor([ids])).logits[0, 0].item()
            for ids in reference_ids(tokenizer, documents)
        ]


def sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


@needs_llama_cpp
def test_tokenizer_gives_the_models_own_ids(tiny_bert: tuple[Path, Any, Any]) -> None:
    path, _, reference_tokenizer = tiny_bert
    backend = load_backend_at(path, device="cpu")
    for document, expected in zip(DOCUMENTS, reference_ids(reference_tokenizer, DOCUMENTS), strict=True):
        assert backend.tokenizer.encode(QUERY, document).ids == expected, document
        if document:
            assert reference_tokenizer(QUERY, document)["input_ids"] == expected


@needs_llama_cpp
def test_scores_match_transformers(tiny_bert: tuple[Path, Any, Any]) -> None:
    path, model, reference_tokenizer = tiny_bert
    engine = load_engine(str(path), RuntimeSettings(device="cpu", threads=1))
    try:
        assert engine.info.backend == "llamacpp" and engine.info.max_length == 128
        expected = reference_logits(model, reference_tokenizer, DOCUMENTS)
        # One batch of mixed lengths, then each pair on its own.
        batched = asyncio.run(engine.score(QUERY, DOCUMENTS))
        singles = [asyncio.run(engine.score(QUERY, [document])).logits[0] for document in DOCUMENTS]
    finally:
        engine.close()
    assert len({round(value, 1) for value in expected}) > 3, "the random model should spread its scores"
    for logits in (batched.logits, singles):
        assert np.max(np.abs(np.array(logits) - expected)) <= LOGIT_TOLERANCE
        scores = [sigmoid(value) for value in logits]
        assert max(abs(a - sigmoid(b)) for a, b in zip(scores, expected, strict=True)) <= SCORE_TOLERANCE
    assert np.max(np.abs(np.array(batched.logits) - singles)) <= 1e-4
    assert batched.token_count == sum(map(len, reference_ids(reference_tokenizer, DOCUMENTS)))


@needs_llama_cpp
def test_batches_larger_than_the_context_are_split(tiny_bert: tuple[Path, Any, Any]) -> None:
    path, _, reference_tokenizer = tiny_bert
    pairs = [Pair(ids, len(ids)) for ids in reference_ids(reference_tokenizer, DOCUMENTS)]
    small = load_backend_at(path, device="cpu", max_batch_tokens=128, max_batch_pairs=2)
    logits = small.relevance_logits(Batch(pairs * 3))
    one_by_one = [small.relevance_logits(Batch([pair]))[0] for pair in pairs]
    assert np.max(np.abs(np.array(logits) - one_by_one * 3)) <= 1e-4


@pytest.mark.slow
@pytest.mark.network
@needs_llama_cpp
def test_served_over_http(tiny_bert: tuple[Path, Any, Any], tmp_path: Path) -> None:
    path, model, reference_tokenizer = tiny_bert
    expected = reference_logits(model, reference_tokenizer, DOCUMENTS[:3])
    with running_server(["--model", str(path), "--served-model-name", "tiny-bert"], tmp_path / "log") as url:
        body = {"query": QUERY, "documents": DOCUMENTS[:3]}
        scored = httpx.post(f"{url}/rerank", json=body, timeout=60).json()
        raw = httpx.post(f"{url}/rerank", json={**body, "raw_scores": True}, timeout=60).json()
        info = httpx.get(f"{url}/info", timeout=60).text
    assert "llamacpp" in info
    for result in scored["results"]:
        assert abs(result["relevance_score"] - sigmoid(expected[result["index"]])) <= SCORE_TOLERANCE
    for result in raw["results"]:
        assert abs(result["relevance_score"] - expected[result["index"]]) <= LOGIT_TOLERANCE
    assert scored["usage"]["prompt_tokens"] == sum(
        map(len, reference_ids(reference_tokenizer, DOCUMENTS[:3]))
    )


@pytest.mark.slow
def test_deberta_gguf_stays_on_the_torch_gguf_backend(xsmall_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "mxbai-rerank-xsmall-v1.F32.gguf"
    export_gguf(xsmall_model_dir, path, "f32")
    assert load_backend_at(path, dtype="float32").info.backend == "gguf"


@needs_llama_cpp
def test_forcing_a_backend_that_cannot_serve_the_file(
    tiny_bert: tuple[Path, Any, Any], tmp_path: Path
) -> None:
    path, _, _ = tiny_bert
    with pytest.raises(ModelLoadError, match=r"general.architecture is 'bert'.*llama.cpp backend"):
        load_backend_at(path, backend="gguf")
    deberta_like = _gguf_with_architecture(tmp_path / "deberta.gguf", "deberta")
    with pytest.raises(ModelLoadError, match=r"'deberta' is not a reranker llama.cpp serves .*bert"):
        load_backend_at(deberta_like, backend="llamacpp")


def test_unsupported_architecture_names_what_is_supported(tmp_path: Path) -> None:
    path = _gguf_with_architecture(tmp_path / "llama.gguf", "llama")
    with pytest.raises(
        ModelLoadError,
        match=r"no backend serves general.architecture 'llama': .*'deberta'.*'bert', 'jina-bert-v2'",
    ):
        load_backend_at(path)


def test_backend_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(RuntimeSettings, {}).backend == "auto"
    monkeypatch.setenv("RERANKD_BACKEND", "llamacpp")
    assert load_settings(RuntimeSettings, {}).backend == "llamacpp"
    with pytest.raises(ValueError, match="backend"):
        load_settings(RuntimeSettings, {"backend": "onnx"})


def _gguf_with_architecture(path: Path, architecture: str) -> Path:
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
