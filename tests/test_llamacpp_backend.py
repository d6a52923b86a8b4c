"""The llama.cpp backend: a tiny random BERT cross-encoder with segment ids (token types 0 and 1) written as a
llama.cpp GGUF, served by rerankd and compared with a float64 run of `transformers`'
BertForSequenceClassification; backend choice by architecture and by option."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from rerankd.backends.base import Batch, ModelLoadError, Pair
from rerankd.devtools.random_bert_gguf import random_bert_cross_encoder, tiny_bert_vocabulary, write_bert_gguf
from rerankd.engine.loader import load_engine
from rerankd.engine.postprocess import sigmoid
from rerankd.formats.gguf_writer import export_gguf
from rerankd.settings import RuntimeSettings, load_settings

from conftest import load_backend_at, needs_llama_cpp, score_error
from serving import running_server

QUERY = "Who wrote To Kill a Mockingbird?"
DOCUMENTS = [
    "To Kill a Mockingbird is a novel by Harper Lee.",
    "Moby-Dick was written by Herman Melville.",
    "",
    "Jane Austen wrote Pride and Prejudice; the capital of France is Paris. " * 6,
    "Émile wrote 日本 stories, 42 of them!",
    "water",
]
# From the float64 truth, measured at most 1.7e-3 (logits) and 3.6e-4 (sigmoid scores) where the float32
# reference is 2e-6 away: ggml's GELU reads a float16 table, so its input keeps 11 bits. Giving every token
# type 0, as llama.cpp's own id input does, misses by 0.36 (logits) and 0.07 (scores).
SCORE_TOLERANCE = 1e-3
LOGIT_TOLERANCE = 4e-3


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any]:
    """(GGUF path, the reference model in float64, its own tokenizer that transformers builds from a
    vocab.txt)."""
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocabulary = tiny_bert_vocabulary()
    model = random_bert_cross_encoder(vocabulary)
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    reference_tokenizer = BertTokenizer.from_pretrained(folder)
    # The GGUF alone in its folder: the engine's tokenizer is rebuilt from the metadata.
    path = write_bert_gguf(model, vocabulary, tmp_path_factory.mktemp("gguf") / "tiny-bert.F32.gguf")
    return path, model.double(), reference_tokenizer


def reference_pairs(tokenizer: Any, documents: list[str]) -> list[Pair]:
    """`[CLS] query [SEP] document [SEP]` in the model's own ids, token type 1 from the document on, the empty
    document included (transformers' pair API drops an empty second text; the engine scores it like any
    other)."""
    query = tokenizer.encode(QUERY, add_special_tokens=False)
    pairs = [
        Pair(
            [
                tokenizer.cls_token_id,
                *query,
                tokenizer.sep_token_id,
                *tokenizer.encode(document, add_special_tokens=False),
                tokenizer.sep_token_id,
            ],
            len(query) + 2,
        )
        for document in documents
    ]
    assert max(map(len, pairs)) <= 128
    return pairs


def reference_logits(model: Any, tokenizer: Any, documents: list[str], typed: bool = True) -> list[float]:
    """BertForSequenceClassification on each pair, with its token types (or, untyped, all 0)."""
    with torch.no_grad():
        return [
            model(
                input_ids=torch.tensor([pair.ids]),
                token_type_ids=torch.tensor([pair.token_type_ids if typed else [0] * len(pair)]),
            )
            .logits[0, 0]
            .item()
            for pair in reference_pairs(tokenizer, documents)
        ]


@needs_llama_cpp
def test_tokenizer_gives_the_models_own_ids(tiny_bert: tuple[Path, Any, Any]) -> None:
    path, _, reference_tokenizer = tiny_bert
    backend = load_backend_at(path, device="cpu")
    for document, expected in zip(DOCUMENTS, reference_pairs(reference_tokenizer, DOCUMENTS), strict=True):
        encoding = backend.tokenizer.encode(QUERY, document)
        assert (encoding.ids, encoding.type_ids) == (expected.ids, expected.token_type_ids), document
        if document:
            reference = reference_tokenizer(QUERY, document)
            assert (reference["input_ids"], reference["token_type_ids"]) == (
                expected.ids,
                expected.token_type_ids,
            )


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
        assert score_error(logits, expected) <= SCORE_TOLERANCE
    # The bound is tight enough to catch what llama.cpp's id input gives: type 0 for every token.
    untyped = reference_logits(model, reference_tokenizer, DOCUMENTS, typed=False)
    assert score_error(batched.logits, untyped) > 10 * SCORE_TOLERANCE
    assert np.max(np.abs(np.array(batched.logits) - singles)) <= 1e-4
    assert batched.token_count == sum(map(len, reference_pairs(reference_tokenizer, DOCUMENTS)))


@needs_llama_cpp
def test_batches_larger_than_the_context_are_split(tiny_bert: tuple[Path, Any, Any]) -> None:
    path, _, reference_tokenizer = tiny_bert
    pairs = reference_pairs(reference_tokenizer, DOCUMENTS)
    small = load_backend_at(path, device="cpu", max_batch_tokens=128, max_batch_pairs=2)
    logits = small.relevance_logits(Batch(pairs * 3))
    one_by_one = [small.relevance_logits(Batch([pair]))[0] for pair in pairs]
    assert np.max(np.abs(np.array(logits) - one_by_one * 3)) <= 1e-4


@needs_llama_cpp
@pytest.mark.parametrize("table_type", ["F16", "Q8_0"])
def test_token_embeddings_stored_in_any_type(
    tiny_bert: tuple[Path, Any, Any], table_type: str, tmp_path: Path
) -> None:
    """The token embedding table, which the backend reads itself to add the token types, as llama.cpp's
    quantizer stores it: the file scores as the float64 model with its table rounded the same way."""
    import llama_cpp

    path, model, reference_tokenizer = tiny_bert
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.token_embedding_type = getattr(llama_cpp, f"GGML_TYPE_{table_type}")
    stored = tmp_path / f"tiny-bert-{table_type}-table.gguf"
    assert llama_cpp.llama_model_quantize(str(path).encode(), str(stored).encode(), params) == 0
    rounded = copy.deepcopy(model)
    table = rounded.bert.embeddings.word_embeddings.weight
    kind = gguf.GGMLQuantizationType[table_type]
    with torch.no_grad():
        table.copy_(torch.from_numpy(dequantize(quantize(table.float().numpy(), kind), kind)))
    backend = load_backend_at(stored, device="cpu")
    logits = backend.relevance_logits(Batch(reference_pairs(reference_tokenizer, DOCUMENTS)))
    assert score_error(logits, reference_logits(rounded, reference_tokenizer, DOCUMENTS)) <= SCORE_TOLERANCE


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
        map(len, reference_pairs(reference_tokenizer, DOCUMENTS[:3]))
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
        load_settings(RuntimeSettings, {"backend": "tensorrt"})


def _gguf_with_architecture(path: Path, architecture: str) -> Path:
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
