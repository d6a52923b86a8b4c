"""Every rerank dialect through a real uvicorn on loopback, called with the clients people already use.

Each dialect must give the same scores as rerankd's own route for the same query and documents.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import cohere
import httpx
import pytest
import torch
from infinity_client import Client as InfinityClient
from infinity_client.api.default import rerank as infinity_rerank
from infinity_client.models import RerankInput
from langchain_cohere import CohereRerank
from langchain_core.documents import Document
from mixedbread import Mixedbread
from tokenizers import Tokenizer
from transformers import DebertaV2ForSequenceClassification

from rerankd.engine.postprocess import sigmoid

from serving import metric, running_server, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.network]  # real server processes on loopback

SERVED_NAME = "mixedbread-ai/mxbai-rerank-xsmall-v1"
API_KEY = "test-key"
QUERY = "Who wrote To Kill a Mockingbird?"
DOCUMENTS = [
    "To Kill a Mockingbird is a novel by Harper Lee.",
    "Moby-Dick was written by Herman Melville.",
    "Jane Austen wrote Pride and Prejudice.",
    "",
    "Harper Lee was born in Monroeville, Alabama, in 1926.",
]
TOLERANCE = 1e-5  # batch composition differs between calls: float32 noise only


@pytest.fixture(scope="module")
def server(xsmall_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("dialects") / "server.log"
    args = [
        "--model",
        str(xsmall_model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--max-chunks-per-doc",
        "32",
    ]
    with running_server(args, log) as base_url:
        yield base_url


def native_scores(server: str, query: str = QUERY, documents: list[str] = DOCUMENTS) -> dict[int, float]:
    response = httpx.post(f"{server}/rerank", json={"query": query, "documents": documents}, timeout=120)
    assert response.status_code == 200, response.text
    return {result["index"]: result["relevance_score"] for result in response.json()["results"]}


def assert_same_ranking(indices: list[int], scores: list[float], expected: dict[int, float]) -> None:
    assert scores == sorted(scores, reverse=True)
    for index, score in zip(indices, scores, strict=True):
        assert score == pytest.approx(expected[index], abs=TOLERANCE)


def test_cohere_v1_client(server: str) -> None:
    expected = native_scores(server)
    client = cohere.Client(api_key=API_KEY, base_url=server)
    response = client.rerank(
        model=SERVED_NAME, query=QUERY, documents=DOCUMENTS, top_n=3, return_documents=True
    )
    indices = [result.index for result in response.results]
    assert indices == sorted(expected, key=lambda index: -expected[index])[:3]
    assert_same_ranking(indices, [result.relevance_score for result in response.results], expected)
    assert [result.document.text for result in response.results] == [DOCUMENTS[index] for index in indices]


def test_cohere_v1_object_documents_and_rank_fields(server: str) -> None:
    # A rank field is a string: a number is refused, not scored as its JSON text (test_hostile_validation.py).
    objects = [
        {"title": f"t{index}", "text": text, "year": str(1960 + index)}
        for index, text in enumerate(DOCUMENTS)
    ]
    by_text = httpx.post(
        f"{server}/v1/rerank", json={"query": QUERY, "documents": objects}, timeout=120
    ).json()
    expected = native_scores(server)
    assert_same_ranking(
        [result["index"] for result in by_text["results"]],
        [result["relevance_score"] for result in by_text["results"]],
        expected,
    )
    fields = ["title", "text", "year"]
    rendered = [
        f"title: t{index}\ntext: {text}\nyear: {1960 + index}" for index, text in enumerate(DOCUMENTS)
    ]
    client = cohere.Client(api_key=API_KEY, base_url=server)
    response = client.rerank(query=QUERY, documents=objects, rank_fields=fields, return_documents=True)
    assert_same_ranking(
        [result.index for result in response.results],
        [result.relevance_score for result in response.results],
        native_scores(server, QUERY, rendered),
    )
    assert response.results[0].document.text == objects[response.results[0].index]["text"]
    returned = httpx.post(
        f"{server}/v1/rerank",
        json={"query": QUERY, "documents": objects, "rank_fields": fields, "return_documents": True},
        timeout=120,
    ).json()
    assert all(result["document"] == objects[result["index"]] for result in returned["results"])


def test_cohere_v2_client(server: str) -> None:
    expected = native_scores(server)
    client = cohere.ClientV2(api_key=API_KEY, base_url=server)
    response = client.rerank(model=SERVED_NAME, query=QUERY, documents=DOCUMENTS, top_n=4)
    assert len(response.results) == 4
    assert_same_ranking(
        [result.index for result in response.results],
        [result.relevance_score for result in response.results],
        expected,
    )
    capped = client.rerank(model=SERVED_NAME, query=QUERY, documents=DOCUMENTS, max_tokens_per_doc=3)
    capped_scores = {result.index: result.relevance_score for result in capped.results}
    assert set(capped_scores) == set(range(len(DOCUMENTS)))
    assert capped_scores[3] == pytest.approx(expected[3], abs=TOLERANCE)  # the empty document: nothing to cut
    assert all(abs(capped_scores[index] - expected[index]) > TOLERANCE for index in (0, 1, 2, 4))


def test_langchain_cohere_rerank_reorders_documents(server: str) -> None:
    expected = native_scores(server)
    reranker = CohereRerank(model=SERVED_NAME, cohere_api_key=API_KEY, base_url=server, top_n=3)
    documents = [
        Document(page_content=text, metadata={"source": index}) for index, text in enumerate(DOCUMENTS)
    ]
    compressed = reranker.compress_documents(documents, QUERY)
    order = [document.metadata["source"] for document in compressed]
    assert order == sorted(expected, key=lambda index: -expected[index])[:3]
    assert [document.page_content for document in compressed] == [DOCUMENTS[index] for index in order]
    assert_same_ranking(order, [document.metadata["relevance_score"] for document in compressed], expected)


def test_mixedbread_client(server: str) -> None:
    expected = native_scores(server)
    client = Mixedbread(api_key=API_KEY, base_url=server)
    response = client.rerank(model=SERVED_NAME, query=QUERY, input=DOCUMENTS, top_k=2, return_input=True)
    assert response.object == "list" and response.top_k == 2 and response.return_input
    assert [item.object for item in response.data] == ["rank_result", "rank_result"]
    assert_same_ranking(
        [item.index for item in response.data], [item.score for item in response.data], expected
    )
    assert [item.input for item in response.data] == [DOCUMENTS[item.index] for item in response.data]
    assert response.usage.total_tokens > 0
    objects = [{"body": text, "id": index} for index, text in enumerate(DOCUMENTS)]
    by_field = client.rerank(query=QUERY, input=objects, rank_fields=["body"], return_input=True)
    assert_same_ranking(
        [item.index for item in by_field.data], [item.score for item in by_field.data], expected
    )
    assert by_field.data[0].input == objects[by_field.data[0].index]


def test_infinity_client(server: str) -> None:
    expected = native_scores(server)
    client = InfinityClient(base_url=server, timeout=120)
    result = infinity_rerank.sync(
        client=client, body=RerankInput(query=QUERY, documents=DOCUMENTS, return_documents=True, top_n=3)
    )
    assert len(result.results) == 3
    indices = [item.index for item in result.results]
    assert_same_ranking(indices, [item.relevance_score for item in result.results], expected)
    assert [item.document for item in result.results] == [DOCUMENTS[index] for index in indices]
    assert result.usage.total_tokens > 0


def test_tei_request_gets_one_result_per_text(server: str) -> None:
    expected = native_scores(server)
    response = httpx.post(
        f"{server}/rerank", json={"query": QUERY, "texts": DOCUMENTS, "return_text": True}, timeout=120
    )
    assert response.status_code == 200, response.text
    results = response.json()
    assert isinstance(results, list) and len(results) == len(DOCUMENTS)
    assert_same_ranking([item["index"] for item in results], [item["score"] for item in results], expected)
    assert all(item["text"] == DOCUMENTS[item["index"]] for item in results)
    raw = httpx.post(f"{server}/rerank", json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": True}).json()
    assert all(
        sigmoid(item["score"]) == pytest.approx(expected[item["index"]], abs=TOLERANCE) for item in raw
    )


def test_tei_truncation_options(server: str) -> None:
    long_text = " ".join(f"word{index}" for index in range(800))
    refused = httpx.post(
        f"{server}/rerank", json={"query": QUERY, "texts": ["ok", long_text], "truncate": False}
    )
    assert refused.status_code == 413
    assert refused.json()["error_type"] == "Validation" and refused.json()["error"].startswith("texts.1:")

    def score(direction: str) -> float:
        body = {"query": QUERY, "texts": [long_text], "truncate": True, "truncation_direction": direction}
        return httpx.post(f"{server}/rerank", json=body, timeout=120).json()[0]["score"]

    assert score("Right") == pytest.approx(native_scores(server, QUERY, [long_text])[0], abs=TOLERANCE)
    assert abs(score("left") - score("right")) > TOLERANCE


def test_antfly_route_answers_in_input_order(server: str) -> None:
    expected = native_scores(server)
    for field in ("documents", "prompts"):
        body = httpx.post(
            f"{server}/ai/v1/rerank",
            json={"model": SERVED_NAME, "query": QUERY, field: DOCUMENTS},
            timeout=120,
        ).json()
        assert body["object"] == "list" and body["model"] == SERVED_NAME
        assert [item["index"] for item in body["data"]] == list(range(len(DOCUMENTS)))
        assert all(item["object"] == "rerank.score" for item in body["data"])
        assert all(
            item["score"] == pytest.approx(expected[item["index"]], abs=TOLERANCE) for item in body["data"]
        )
        assert body["usage"]["total_tokens"] > 0
    both = httpx.post(f"{server}/ai/v1/rerank", json={"query": QUERY, "documents": ["a"], "prompts": ["b"]})
    assert both.status_code == 422 and "not both" in both.json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "status", "read"),
    [
        ("/rerank", {"query": QUERY, "texts": []}, 422, lambda body: body["error_type"] + body["error"]),
        (
            "/v1/rerank",
            {"query": QUERY, "documents": [1]},
            422,
            lambda body: body["detail"] + body["message"],
        ),
        ("/v2/rerank", {"query": QUERY, "documents": ["a"]}, 422, lambda body: body["message"]),
        ("/v1/reranking", {"query": QUERY}, 422, lambda body: body["detail"]),
        ("/ai/v1/rerank", {"query": " ", "documents": ["a"]}, 422, lambda body: body["error"]),
        (
            "/rerank",
            {"query": QUERY, "documents": ["a"], "model": "nope"},
            404,
            lambda b: b["error"]["message"],
        ),
        (
            "/v1/rerank",
            {"query": QUERY, "documents": ["a"], "model": "nope"},
            404,
            lambda body: body["message"],
        ),
        ("/v1/rerank", {"query": QUERY, "documents": [{"title": "x"}]}, 422, lambda body: body["detail"]),
        (
            "/v1/rerank",
            {"query": QUERY, "documents": ["a"], "max_chunks_per_doc": 33},
            422,
            lambda body: body["message"],
        ),
    ],
)
def test_errors_come_in_each_dialects_shape(server: str, path: str, body: dict, status: int, read) -> None:
    response = httpx.post(f"{server}{path}", json=body)
    assert response.status_code == status, response.text
    message = read(response.json())
    assert message and "Traceback" not in message


def test_invalid_json_gets_the_dialects_shape(server: str) -> None:
    broken = httpx.post(f"{server}/v1/rerank", content=b"{nope", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["message"].startswith("request body is not valid JSON")


def five_thousand_words(msmarco_dir: Path) -> str:
    words: list[str] = []
    with (msmarco_dir / "corpus.jsonl").open() as corpus:
        for line in corpus:
            words.extend(json.loads(line)["text"].split())
            if len(words) >= 5000:
                return " ".join(words[:5000])
    raise AssertionError("the corpus has fewer than 5,000 words")


def reference_window_logits(model_dir: Path, query: str, document: str, overlap: int = 64) -> list[float]:
    """Windows built here from the tokenizer alone, each scored on its own by transformers' DeBERTa in
    float64."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    query_ids = tokenizer.encode(query, add_special_tokens=False).ids
    document_ids = tokenizer.encode(document, add_special_tokens=False).ids
    room = 512 - 3 - len(query_ids)
    starts = [0]
    while starts[-1] + room < len(document_ids):
        starts.append(starts[-1] + room - overlap)
    model = DebertaV2ForSequenceClassification.from_pretrained(model_dir, dtype=torch.float64).eval()
    logits = []
    with torch.inference_mode():
        for start in starts:
            ids = [1, *query_ids, 2, *document_ids[start : start + room], 2]
            logits.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    return logits


def test_a_five_thousand_word_document_scores_its_best_chunk(
    server: str, xsmall_model_dir: Path, msmarco_dir: Path
) -> None:
    document = five_thousand_words(msmarco_dir)
    documents = [document, DOCUMENTS[0]]
    logits = reference_window_logits(xsmall_model_dir, QUERY, document)
    best = max(range(len(logits)), key=lambda index: logits[index])
    assert len(logits) > 10

    native = httpx.post(
        f"{server}/rerank",
        json={"query": QUERY, "documents": documents, "long_documents": "chunk"},
        timeout=120,
    ).json()
    result = next(item for item in native["results"] if item["index"] == 0)
    assert result["relevance_score"] == pytest.approx(sigmoid(logits[best]), abs=1e-4)
    assert result["chunk"]["index"] == best and result["chunk"]["count"] == len(logits)
    window_text = document[result["chunk"]["start"] : result["chunk"]["end"]]
    assert 1000 < len(window_text) < len(document)

    cohere_v1 = cohere.Client(api_key=API_KEY, base_url=server).rerank(
        query=QUERY, documents=documents, max_chunks_per_doc=32
    )
    chunked = next(item for item in cohere_v1.results if item.index == 0)
    assert chunked.relevance_score == pytest.approx(result["relevance_score"], abs=TOLERANCE)

    truncated = native_scores(server, QUERY, documents)[0]
    assert truncated == pytest.approx(sigmoid(logits[0]), abs=1e-4)
    few = httpx.post(
        f"{server}/rerank",
        json={"query": QUERY, "documents": [document], "long_documents": "chunk", "max_chunks_per_doc": 2},
        timeout=120,
    ).json()["results"][0]
    assert few["chunk"]["count"] == 2
    assert few["relevance_score"] == pytest.approx(sigmoid(max(logits[:2])), abs=1e-4)


def test_a_long_query_is_truncated_with_a_flag_never_an_error(server: str) -> None:
    query = "who wrote the novel " * 150
    body = {"query": query, "documents": ["word " * 600], "long_documents": "chunk"}
    native = httpx.post(f"{server}/rerank", json=body, timeout=120)
    assert native.status_code == 200 and native.json()["query_truncated"] is True
    v1 = httpx.post(f"{server}/v1/rerank", json={"query": query, "documents": ["word " * 600]}, timeout=120)
    assert v1.status_code == 200 and v1.json()["meta"]["warnings"]
    short = httpx.post(f"{server}/rerank", json={"query": QUERY, "documents": ["a"]}).json()
    assert "query_truncated" not in short


def test_openapi_describes_every_route_with_examples(server: str) -> None:
    schema = httpx.get(f"{server}/openapi.json").json()
    for path in ("/rerank", "/v1/rerank", "/v2/rerank", "/v1/reranking", "/ai/v1/rerank"):
        operation = schema["paths"][path]["post"]
        assert operation["summary"]
        body_schema = operation["requestBody"]["content"]["application/json"]["schema"]
        names = [ref["$ref"].rsplit("/", 1)[-1] for ref in body_schema.get("oneOf", [body_schema])]
        assert all(schema["components"]["schemas"][name].get("examples") for name in names), path
    assert set(schema["paths"]["/rerank"]["post"]["responses"]) >= {"200", "413", "422", "429"}
    assert httpx.get(f"{server}/docs").status_code == 200


@pytest.fixture(scope="module")
def busy_server(xsmall_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("busy") / "server.log"
    args = ["--model", str(xsmall_model_dir), "--served-model-name", SERVED_NAME]
    args += ["--max-queued-pairs", "8", "--max-batch-pairs", "4"]
    with running_server(args, log) as base_url:
        yield base_url


def test_a_full_queue_answers_429_with_retry_after_in_each_shape(busy_server: str, msmarco_dir: Path) -> None:
    """A request larger than the queue's limit is taken into an empty queue; while most of it still waits
    there (four pairs a batch), small requests are refused in each dialect's error shape."""
    with (msmarco_dir / "corpus.jsonl").open() as corpus:
        passages = [json.loads(line)["text"] for line in itertools.islice(corpus, 300)]
    big: dict[str, httpx.Response] = {}
    body = {"query": QUERY, "documents": passages}
    worker = threading.Thread(
        target=lambda: big.update(response=httpx.post(f"{busy_server}/rerank", json=body, timeout=300))
    )
    worker.start()
    wait_until(lambda: metric(busy_server, "rerankd_queued_pairs") >= 200, poll_seconds=0.01)
    refused = {
        path: httpx.post(f"{busy_server}{path}", json=small, timeout=120)
        for path, small in (
            ("/rerank", {"query": QUERY, "texts": DOCUMENTS}),
            ("/v2/rerank", {"model": SERVED_NAME, "query": QUERY, "documents": DOCUMENTS}),
        )
    }
    worker.join(timeout=300)
    assert big["response"].status_code == 200 and len(big["response"].json()["results"]) == 300
    assert all(response.status_code == 429 for response in refused.values())
    assert all(response.headers["retry-after"] == "1" for response in refused.values())
    assert refused["/rerank"].json()["error_type"] == "Overloaded"
    assert "--max-queued-pairs" in refused["/v2/rerank"].json()["message"]
