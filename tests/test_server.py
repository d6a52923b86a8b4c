"""The HTTP API through a real uvicorn on loopback, serving a random-weight base-geometry model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from transformers import DebertaV2ForSequenceClassification, PreTrainedTokenizerFast

from rerankd.engine.postprocess import sigmoid

from serving import running_server

pytestmark = [pytest.mark.slow, pytest.mark.network]  # real server processes on loopback

SERVED_NAME = "mixedbread-ai/mxbai-rerank-base-v1"
MAX_DOCUMENTS = 50
CURL_EXAMPLE = {
    "model": "antflydb/mxbai-rerank-base-v1",
    "query": "Who wrote To Kill a Mockingbird?",
    "documents": [
        "To Kill a Mockingbird is a novel by Harper Lee.",
        "Moby-Dick was written by Herman Melville.",
        "Jane Austen wrote Pride and Prejudice.",
    ],
}


@pytest.fixture(scope="module")
def server(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--model", str(base_model_dir), "--served-model-name", SERVED_NAME]
    with running_server([*args, "--max-documents", str(MAX_DOCUMENTS)], log) as base_url:
        yield base_url


def post(server: str, body: object) -> httpx.Response:
    return httpx.post(f"{server}/rerank", json=body, timeout=120)


def test_model_card_example_returns_three_sorted_results(server: str, base_model_dir: Path) -> None:
    response = post(server, CURL_EXAMPLE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == SERVED_NAME
    assert body["id"].startswith("rerank-")
    results = body["results"]
    assert sorted(result["index"] for result in results) == [0, 1, 2]
    scores = [result["relevance_score"] for result in results]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < score < 1.0 for score in scores)
    assert all("document" not in result for result in results)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0

    # The served scores are the reference model's sigmoid(logit), the reference run in float64 (the truth
    # float32 is bounded against, whatever the CPU's kernels round).
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(base_model_dir / "tokenizer.json"))
    reference = DebertaV2ForSequenceClassification.from_pretrained(base_model_dir, dtype=torch.float64).eval()
    documents = CURL_EXAMPLE["documents"]
    for result in results:
        inputs = tokenizer([CURL_EXAMPLE["query"]], [documents[result["index"]]], return_tensors="pt")
        with torch.inference_mode():
            logit = reference(input_ids=inputs["input_ids"]).logits[0, 0].item()
        assert result["relevance_score"] == pytest.approx(sigmoid(logit), abs=1e-5)


def test_return_documents_top_n_and_raw_scores(server: str) -> None:
    full = post(server, CURL_EXAMPLE).json()["results"]
    body = post(server, {**CURL_EXAMPLE, "top_n": 2, "return_documents": True, "raw_scores": True}).json()
    assert [result["index"] for result in body["results"]] == [result["index"] for result in full[:2]]
    for raw, scored in zip(body["results"], full, strict=False):
        assert raw["document"] == {"text": CURL_EXAMPLE["documents"][raw["index"]]}
        assert sigmoid(raw["relevance_score"]) == pytest.approx(scored["relevance_score"], abs=1e-6)
    assert len(post(server, {**CURL_EXAMPLE, "top_n": 99}).json()["results"]) == 3


def test_model_is_optional_and_served_name_is_accepted(server: str) -> None:
    for model in (None, SERVED_NAME, "antflydb/mxbai-rerank-base-v1"):
        body = {key: value for key, value in {**CURL_EXAMPLE, "model": model}.items() if value is not None}
        assert post(server, body).status_code == 200


def test_empty_and_overlong_documents_are_scored(server: str) -> None:
    documents = ["", "long " * 5000, "short"]
    body = post(server, {"query": "q", "documents": documents}).json()
    assert sorted(result["index"] for result in body["results"]) == [0, 1, 2]
    assert body["usage"]["total_tokens"] <= 3 * 512


@pytest.mark.parametrize(
    ("body", "status", "field", "message"),
    [
        ({"documents": ["a"]}, 422, "query", "query: field required"),
        ({"query": "   ", "documents": ["a"]}, 422, "query", "query: must not be blank"),
        ({"query": 7, "documents": ["a"]}, 422, "query", "query: Input should be a valid string"),
        ({"query": "q"}, 422, "documents", "documents: field required"),
        ({"query": "q", "documents": []}, 422, "documents", "documents: List should have at least 1 item"),
        ({"query": "q", "documents": "a"}, 422, "documents", "documents: Input should be a valid list"),
        (
            {"query": "q", "documents": ["a", 5]},
            422,
            "documents.1",
            "documents.1: Input should be a valid string",
        ),
        (
            {"query": "q", "documents": ["a", None]},
            422,
            "documents.1",
            "documents.1: Input should be a valid string",
        ),
        ({"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n", "top_n: Input should be greater than"),
        (
            {"query": "q", "documents": ["a"], "top_n": -3},
            422,
            "top_n",
            "top_n: Input should be greater than",
        ),
        (
            {"query": "q", "documents": ["a"], "top_n": "2"},
            422,
            "top_n",
            "top_n: Input should be a valid integer",
        ),
        (
            {"query": "q", "documents": ["a"], "return_documents": "yes"},
            422,
            "return_documents",
            "valid boolean",
        ),
        (["q", "a"], 422, "body", "body: must be a JSON object"),
        (
            {"query": "q", "documents": ["a"] * (MAX_DOCUMENTS + 1)},
            413,
            "documents",
            f"documents: {MAX_DOCUMENTS + 1} documents exceed the limit of {MAX_DOCUMENTS}",
        ),
        ({"model": "nope/missing", "query": "q", "documents": ["a"]}, 404, "model", SERVED_NAME),
    ],
)
def test_bad_input_gets_a_clear_4xx(server: str, body: object, status: int, field: str, message: str) -> None:
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    assert error["param"] == field
    assert message in error["message"]
    assert error["type"]


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "message"),
    [
        (b"{not json", "application/json", 400, "request body is not valid JSON"),
        (b'{"query": "q", "documents": ["a"]', "application/json", 400, "request body is not valid JSON"),
        (b"\xff\xfe", "application/json", 400, "request body is not valid JSON"),
        (b"", "application/json", 422, "body: field required"),
        (
            b"null",
            "application/json",
            422,
            "body: must be a JSON object (sent as Content-Type: application/json)",
        ),
        (b'{"query": "q", "documents": ["a"]}', "text/plain", 422, "body: must be a JSON object"),
    ],
)
def test_malformed_bodies(server: str, raw: bytes, content_type: str, status: int, message: str) -> None:
    response = httpx.post(f"{server}/rerank", content=raw, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    assert error["param"] == "body"
    assert error["message"].startswith(message)


def test_unknown_route_and_method_use_the_error_shape(server: str) -> None:
    assert httpx.get(f"{server}/nowhere").json()["error"]["code"] == 404
    assert httpx.get(f"{server}/rerank").json()["error"]["code"] == 405


def test_info_names_the_served_model_and_its_runtime(server: str) -> None:
    info = httpx.get(f"{server}/info").json()
    assert info["max_documents"] == MAX_DOCUMENTS
    [model] = info["models"]
    assert model["name"] == SERVED_NAME
    assert (model["backend"], model["device"], model["dtype"]) == ("torch", "cpu", "float32")
    assert model["max_length"] == 512
    assert model["max_batch_tokens"] == 1024  # the CPU default
    assert model["untrained"] is True
