"""LLM rerankers (Qwen3-Reranker, mxbai-rerank-v2) on the torch backend, against their references in float64:
Qwen3-Reranker's model card code (`transformers`' causal LM, the card's prompt, left padding, P(yes) over
yes/no), and Mixedbread's own `mxbai-rerank` package, which needs transformers 4.x and so runs in its own
environment (`make install-test` builds `.venv-mxbai`)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cohere
import httpx
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from rerankd.bench.peers import Qwen3Card
from rerankd.catalog import CAUSAL_FAMILY_MODELS
from rerankd.devtools.random_causal import write_random_causal
from rerankd.devtools.random_encoders import write_random_encoder
from rerankd.engine.engine import RerankEngine
from rerankd.engine.loader import load_engine
from rerankd.engine.postprocess import sigmoid
from rerankd.engine.tokenize import InstructionNotTakenError, PairOptions
from rerankd.modeling.causal import CAUSAL_FAMILIES, QWEN3_DEFAULT_INSTRUCTION
from rerankd.settings import RuntimeSettings

from conftest import MXBAI_PYTHON
from serving import rank_order, running_server

MXBAI_REFERENCE = Path(__file__).with_name("references") / "mxbai_rerank_v2.py"
QUERY = "how are the arguments of a function call evaluated?"
# Texts whose pieces meet at every kind of boundary Qwen's pre-tokenizer has: punctuation, spaces, newlines.
QUERIES = [QUERY, "who wrote the probe ", "tabs\tand a newline!\n", ""]
DOCUMENTS = [
    "The arguments are evaluated from left to right before the function is called.",
    "(note) a parenthesis first, then: a colon",
    "",
    "  two spaces first",
    "\na newline first",
    "A class definition creates a new local namespace. " * 12,
]
INSTRUCTION = "Given a question about Python, find the passage of its documentation that answers it"
# float32 against float64 on the same network: scores measured at most 5.3e-7 on these tiny models (AMD EPYC,
# AVX512-BF16); a token off in the prompt moves them by 1e-3 or more.
LOGIT_BOUND = 2e-5
CAUSAL_FAMILIES_BY_NAME = {family.name: family for family in CAUSAL_FAMILIES.values()}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        family: write_random_causal(tmp_path_factory.mktemp(family), family)
        for family in CAUSAL_FAMILY_MODELS
    }


def engine_for(folder: Path, **settings) -> RerankEngine:
    return load_engine(str(folder), RuntimeSettings(device="cpu", dtype="float32", **settings))


def qwen3_card(folder: Path, query: str, documents: list[str], instruction: str | None = None):
    """Qwen3-Reranker's model card code, in float64: the pairs it builds and its P(yes) per pair."""
    card = Qwen3Card(str(folder), torch.float64)
    return card.encode(query, documents, instruction), card.score(query, documents, instruction).numpy()


def mxbai_package(folder: Path, query: str, documents: list[str], instruction: str | None = None):
    """`mxbai-rerank`'s MxbaiRerankV2 in float64: the pairs it builds and its logits (1 minus 0)."""
    if not MXBAI_PYTHON.is_file():
        pytest.skip(f"no {MXBAI_PYTHON}: make install-test builds the mxbai-rerank reference environment")
    request = {"model": str(folder), "query": query, "documents": documents, "instruction": instruction}
    ran = subprocess.run(
        [str(MXBAI_PYTHON), str(MXBAI_REFERENCE)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert ran.returncode == 0, ran.stderr
    answer = json.loads(ran.stdout)
    return answer["ids"], np.array(answer["logits"])


def reference(family: str, folder: Path, query: str, documents: list[str], instruction: str | None = None):
    """The family's reference: its pairs, and its relevance (P(yes)) per pair."""
    if family == "qwen3-reranker":
        return qwen3_card(folder, query, documents, instruction)
    ids, logits = mxbai_package(folder, query, documents, instruction)
    return ids, np.array([sigmoid(logit) for logit in logits])


@pytest.mark.parametrize("family", CAUSAL_FAMILY_MODELS)
@pytest.mark.parametrize("instruction", [None, INSTRUCTION], ids=["default", "instruction"])
def test_pairs_and_scores_equal_the_reference(
    family_dirs: dict[str, Path], family: str, instruction: str | None
) -> None:
    engine = engine_for(family_dirs[family], max_length=512)
    options = PairOptions(instruction=instruction)
    try:
        assert engine.info.family == family and engine.info.backend == "torch"
        pairs = [
            [pair.ids for pair in engine.tokenizer.encode(query, DOCUMENTS, options).pairs]
            for query in QUERIES
        ]
        scored = asyncio.run(engine.score(QUERY, DOCUMENTS, options))
    finally:
        engine.close()
    for query, built in zip(QUERIES, pairs, strict=True):
        assert built == reference(family, family_dirs[family], query, DOCUMENTS, instruction)[0], query
    _, truth = reference(family, family_dirs[family], QUERY, DOCUMENTS, instruction)
    scores = np.array([sigmoid(logit) for logit in scored.logits])
    assert np.max(np.abs(scores - truth)) <= LOGIT_BOUND
    assert np.ptp(truth) > 100 * LOGIT_BOUND, "the random model should spread its scores"


def test_the_instruction_reaches_the_model(family_dirs: dict[str, Path]) -> None:
    engine = engine_for(family_dirs["qwen3-reranker"])
    try:
        default = asyncio.run(engine.score(QUERY, DOCUMENTS)).logits
        explicit = asyncio.run(
            engine.score(QUERY, DOCUMENTS, PairOptions(instruction=QWEN3_DEFAULT_INSTRUCTION))
        )
        other = asyncio.run(engine.score(QUERY, DOCUMENTS, PairOptions(instruction=INSTRUCTION))).logits
    finally:
        engine.close()
    assert explicit.logits == default
    assert np.max(np.abs(np.array(other) - default)) > 100 * LOGIT_BOUND


@pytest.mark.parametrize("family", CAUSAL_FAMILY_MODELS)
def test_long_pairs_lose_document_tokens_never_the_prompt_or_query(
    family_dirs: dict[str, Path], family: str
) -> None:
    long_document, long_query = DOCUMENTS[-1] * 4, "which statement ends a loop early " * 40
    whole = engine_for(family_dirs[family], max_length=1024)
    engine = engine_for(family_dirs[family], max_length=160)
    try:
        untruncated = whole.tokenizer.encode(QUERY, [long_document]).pairs[0].ids
        encoded = engine.tokenizer.encode(QUERY, [long_document])
        cut_query = engine.tokenizer.encode(long_query, [""])
        template = engine.tokenizer.template
    finally:
        whole.close()
        engine.close()
    pair = encoded.pairs[0].ids
    kept = 160 - len(template.suffix)
    assert len(pair) == 160 and encoded.documents[0].truncated and not encoded.query_truncated
    assert pair[:kept] == untruncated[:kept]  # the prompt, the query and the document's start
    assert pair[kept:] == template.suffix
    # A query past three quarters of the room is cut, keeping its text's tail (Qwen3's `<Document>:`), and
    # the middle, the document and the suffix follow.
    prompt = CAUSAL_FAMILIES_BY_NAME[family].prompt
    tokenizer = Tokenizer.from_file(str(family_dirs[family] / "tokenizer.json"))
    tail, document = (
        tokenizer.encode(text, add_special_tokens=False).ids
        for text in (prompt.query_tail, prompt.document_text(""))
    )
    ending = [*tail, *template.middle, *document, *template.suffix]
    assert cut_query.query_truncated and len(cut_query.pairs[0]) <= 160
    assert cut_query.pairs[0].ids[-len(ending) :] == ending


def test_chunk_windows_report_spans_of_the_document(family_dirs: dict[str, Path]) -> None:
    engine = engine_for(family_dirs["mxbai-rerank-v2"], max_length=160)
    document = DOCUMENTS[-1] * 3
    try:
        windows = engine.tokenizer.encode(QUERY, [document], PairOptions(chunk=True)).documents[0].windows
    finally:
        engine.close()
    assert len(windows) > 2 and all(len(window.pair) <= 160 for window in windows)
    first, last = windows[0].span, windows[-1].span
    assert first is not None and last is not None
    assert first[0] == 0 and last[1] == len(document)
    assert document[first[0] : first[1]].startswith("A class definition")


def test_an_instruction_for_an_encoder_is_refused(tmp_path: Path) -> None:
    engine = engine_for(write_random_encoder(tmp_path, "bert"))
    try:
        with pytest.raises(InstructionNotTakenError):
            asyncio.run(engine.score(QUERY, DOCUMENTS, PairOptions(instruction=INSTRUCTION)))
    finally:
        engine.close()


@pytest.fixture(scope="module")
def llm_server(family_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("llm-server")
    bert = write_random_encoder(folder / "bert", "bert")
    args = ["--device", "cpu", "--dtype", "float32", "--model", f"qwen3={family_dirs['qwen3-reranker']}"]
    args += ["--model", f"bert={bert}"]
    with running_server(args, folder / "server.log") as base_url:
        yield base_url


@pytest.mark.slow
@pytest.mark.network
def test_served_over_http_with_an_instruction(llm_server: str, family_dirs: dict[str, Path]) -> None:
    _, truth = qwen3_card(family_dirs["qwen3-reranker"], QUERY, DOCUMENTS, INSTRUCTION)
    info = httpx.get(f"{llm_server}/info", timeout=30).json()
    assert {model["name"]: model["family"] for model in info["models"]}["qwen3"] == "qwen3-reranker"
    body = {"model": "qwen3", "query": QUERY, "documents": DOCUMENTS, "instruction": INSTRUCTION}
    answer = httpx.post(f"{llm_server}/rerank", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    scores = {result["index"]: result["relevance_score"] for result in answer.json()["results"]}
    assert np.max(np.abs(np.array([scores[index] for index in range(len(DOCUMENTS))]) - truth)) <= LOGIT_BOUND
    refused = httpx.post(f"{llm_server}/rerank", json={**body, "model": "bert"}, timeout=60)
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["param"] == "instruction" and "'bert'" in error["message"]
    wrong_type = httpx.post(f"{llm_server}/rerank", json={**body, "instruction": 3}, timeout=60)
    assert wrong_type.status_code == 422 and "instruction" in wrong_type.text
    # A dialect without an instruction field gets the model card's default.
    _, default_truth = qwen3_card(family_dirs["qwen3-reranker"], QUERY, DOCUMENTS)
    client = cohere.ClientV2(api_key="unused", base_url=llm_server)
    ranked = client.rerank(model="qwen3", query=QUERY, documents=DOCUMENTS)
    assert {result.index: result.relevance_score for result in ranked.results} == pytest.approx(
        dict(enumerate(default_truth)), abs=LOGIT_BOUND
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", CAUSAL_FAMILY_MODELS)
def test_rank_ranks_with_each_llm_reranker(family_dirs: dict[str, Path], family: str) -> None:
    _, truth = reference(family, family_dirs[family], QUERY, DOCUMENTS)
    assert rank_order(family_dirs[family], QUERY, DOCUMENTS) == list(np.argsort(truth)[::-1])


def test_every_catalogued_llm_reranker_is_served_and_has_a_random_model() -> None:
    from rerankd.devtools.random_causal import PUBLISHED

    assert set(CAUSAL_FAMILY_MODELS) == set(CAUSAL_FAMILIES_BY_NAME) == set(PUBLISHED)
