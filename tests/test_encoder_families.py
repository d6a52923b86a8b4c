"""BERT, ELECTRA, XLM-RoBERTa and ModernBERT cross-encoders on the torch backend, against `transformers` in
float64: the same classifier, fed the pairs its own tokenizer builds (truncated longest-first, with token
type ids), is the truth every score is held to."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import cohere
import httpx
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from rerankd.backends.base import ModelLoadError
from rerankd.catalog import ENCODER_FAMILY_MODELS
from rerankd.devtools import random_encoders
from rerankd.devtools.random_encoders import write_random_encoder
from rerankd.engine.engine import RerankEngine
from rerankd.engine.loader import load_engine
from rerankd.engine.postprocess import sigmoid
from rerankd.engine.tokenize import PairOptions
from rerankd.modeling.encoders import ENCODER_FAMILIES
from rerankd.settings import RuntimeSettings

from conftest import load_backend_at
from serving import rank_order, run_cli, running_server

FAMILIES = tuple(ENCODER_FAMILY_MODELS)
QUERY = "how are the arguments of a function call evaluated"
DOCUMENTS = [
    "The arguments are evaluated from left to right before the function is called.",
    "A class definition creates a new local namespace. " * 12,
    "",
    "An exception is raised when the interpreter meets an error it cannot handle. " * 60,  # truncated
]
LONG_QUERY = "which statement ends a loop early " * 40  # longest-first cuts the query too
# float32 against float64 on the same network: measured at most 3e-6 on these tiny models (AMD EPYC,
# AVX512-BF16); a wrong token type, template or truncation moves logits by 1e-2 or more.
LOGIT_BOUND = 2e-5
CHUNKED = PairOptions(chunk=True)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {family: write_random_encoder(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


def reference_logits(
    folder: Path, query: str, documents: list[str], max_length: int, zero_types: bool = False
):
    """`transformers`' classifier in float64 on the pairs the folder's tokenizer builds (longest-first),
    with the token types it gives (all 0 with `zero_types`); every label's logit per pair."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(max_length, strategy="longest_first")
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float64).eval()
    takes_types = model.config.model_type in ("bert", "electra")
    logits = []
    with torch.no_grad():
        for document in documents:
            encoding = tokenizer.encode(query, document)
            inputs = {"input_ids": torch.tensor([encoding.ids])}
            if takes_types:
                types = [0] * len(encoding.ids) if zero_types else encoding.type_ids
                inputs["token_type_ids"] = torch.tensor([types])
            logits.append(model(**inputs).logits[0].tolist())
    return np.array(logits), [tokenizer.encode(query, document).ids for document in documents]


def engine_for(folder: Path, **settings) -> RerankEngine:
    return load_engine(str(folder), RuntimeSettings(device="cpu", dtype="float32", **settings))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("query", [QUERY, LONG_QUERY], ids=["query", "long-query"])
def test_scores_equal_transformers_in_float64(family_dirs: dict[str, Path], family: str, query: str) -> None:
    engine = engine_for(family_dirs[family], max_length=128)
    try:
        assert engine.info.family == family and engine.info.backend == "torch"
        pairs = engine.tokenizer.encode_pairs(query, DOCUMENTS).input_ids
        scored = asyncio.run(engine.score(query, DOCUMENTS))
    finally:
        engine.close()
    truth, reference_pairs = reference_logits(family_dirs[family], query, DOCUMENTS, max_length=128)
    assert pairs == reference_pairs  # the family's template, truncated as its tokenizer truncates
    assert np.max(np.abs(np.array(scored.logits) - truth[:, 0])) <= LOGIT_BOUND
    assert np.ptp(truth[:, 0]) > 100 * LOGIT_BOUND, "the random model should spread its scores"


def test_bert_needs_its_token_types(family_dirs: dict[str, Path]) -> None:
    """The bound above tells token types apart: every token typed 0 (as llama.cpp feeds BERT) scores
    outside it."""
    truth, _ = reference_logits(family_dirs["bert"], QUERY, DOCUMENTS, 512)
    untyped, _ = reference_logits(family_dirs["bert"], QUERY, DOCUMENTS, 512, zero_types=True)
    assert np.max(np.abs(truth - untyped)) > 100 * LOGIT_BOUND


def test_two_labels_score_as_softmax_of_label_one(tmp_path: Path) -> None:
    folder = write_random_encoder(tmp_path, "bert", num_labels=2, seed=3)
    engine = engine_for(folder)
    try:
        scored = asyncio.run(engine.score(QUERY, DOCUMENTS))
    finally:
        engine.close()
    truth, _ = reference_logits(folder, QUERY, DOCUMENTS, 512)
    softmax_one = torch.softmax(torch.from_numpy(truth), dim=-1)[:, 1].numpy()
    scores = np.array([sigmoid(logit) for logit in scored.logits])
    assert np.max(np.abs(scores - softmax_one)) <= LOGIT_BOUND


def test_chunked_xlm_roberta_windows_keep_the_query_and_template(family_dirs: dict[str, Path]) -> None:
    engine = engine_for(family_dirs["xlm-roberta"], max_length=64)
    try:
        encoded = engine.tokenizer.encode_pairs(QUERY, [DOCUMENTS[3]])
        chunked = asyncio.run(engine.score(QUERY, [DOCUMENTS[3]], CHUNKED))
        windows = engine.tokenizer.encode(QUERY, [DOCUMENTS[3]], CHUNKED).documents[0].windows
    finally:
        engine.close()
    query_ids = (
        Tokenizer.from_file(str(family_dirs["xlm-roberta"] / "tokenizer.json"))
        .encode(QUERY, add_special_tokens=False)
        .ids
    )
    prefix = [0, *query_ids, 2, 2]  # <s> query </s></s>
    assert len(windows) > 3 and chunked.documents[0].windows == len(windows)
    assert all(window.pair.ids[: len(prefix)] == prefix and window.pair.ids[-1] == 2 for window in windows)
    assert all(len(window.pair) <= 64 for window in windows)
    assert encoded.longest == 64


def test_an_architecture_rerankd_does_not_serve_is_refused_by_name(
    family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "gpt2"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (folder / name).write_bytes((family_dirs["bert"] / name).read_bytes())
    config = json.loads((family_dirs["bert"] / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPT2ForSequenceClassification"]})
    )
    with pytest.raises(ModelLoadError, match=r"GPT2ForSequenceClassification.*BertForSequenceClassification"):
        load_backend_at(folder, device="cpu")


def test_a_tokenizer_whose_template_is_not_the_familys_is_refused(
    family_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """An XLM-R classifier with a `[CLS] A [SEP] B [SEP]` tokenizer would score every pair wrong."""
    folder = tmp_path / "mismatched"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((family_dirs["xlm-roberta"] / name).read_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((family_dirs["modernbert"] / name).read_bytes())
    with pytest.raises(ModelLoadError, match=r"expected \[CLS\] query \[SEP\] \[SEP\] passage \[SEP\]"):
        load_backend_at(folder, device="cpu")


@pytest.fixture(scope="module")
def family_server(family_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("families") / "server.log"
    args = ["--device", "cpu", "--dtype", "float32"]
    for family in ("bert", "xlm-roberta"):
        args += ["--model", f"{family}={family_dirs[family]}"]
    with running_server(args, log) as base_url:
        yield base_url


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_served_over_http_through_the_dialects(
    family_server: str, family_dirs: dict[str, Path], family: str
) -> None:
    truth, _ = reference_logits(family_dirs[family], QUERY, DOCUMENTS, 512)
    expected = [sigmoid(logit) for logit in truth[:, 0]]
    info = httpx.get(f"{family_server}/info", timeout=30).json()
    assert {model["name"]: model["family"] for model in info["models"]}[family] == family
    native = httpx.post(
        f"{family_server}/rerank", json={"model": family, "query": QUERY, "documents": DOCUMENTS}, timeout=60
    ).json()
    scores = {result["index"]: result["relevance_score"] for result in native["results"]}
    assert (
        np.max(np.abs(np.array([scores[index] for index in range(len(DOCUMENTS))]) - expected)) <= LOGIT_BOUND
    )
    client = cohere.ClientV2(api_key="unused", base_url=family_server)
    ranked = client.rerank(model=family, query=QUERY, documents=DOCUMENTS)
    assert [result.index for result in ranked.results] == list(np.argsort(expected)[::-1])


@pytest.mark.slow
@pytest.mark.network
def test_tei_clients_get_the_default_model(family_server: str, family_dirs: dict[str, Path]) -> None:
    """TEI's body names no model: the first one served (here BERT) answers it."""
    truth, _ = reference_logits(family_dirs["bert"], QUERY, DOCUMENTS, 512)
    tei = httpx.post(f"{family_server}/rerank", json={"query": QUERY, "texts": DOCUMENTS}, timeout=60)
    assert tei.status_code == 200, tei.text
    scores = {item["index"]: item["score"] for item in tei.json()}
    expected = {index: sigmoid(logit) for index, logit in enumerate(truth[:, 0])}
    assert scores == pytest.approx(expected, abs=LOGIT_BOUND)


def test_every_catalogued_family_is_served_and_has_a_random_model() -> None:
    assert set(random_encoders.FAMILIES) == set(ENCODER_FAMILY_MODELS)
    assert set(ENCODER_FAMILY_MODELS) <= {family.name for family in ENCODER_FAMILIES.values()}


@pytest.mark.slow
def test_random_model_writes_a_family_folder(tmp_path: Path) -> None:
    written = run_cli("random-model", str(tmp_path / "bert"), "--family", "bert", "--geometry", "tiny")
    assert written.returncode == 0, written.stderr
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["rerankd_untrained"]
    refused = run_cli("random-model", str(tmp_path / "x"), "--family", "bert", "--geometry", "base")
    assert refused.returncode != 0 and "--geometry tiny or published" in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_rank_ranks_with_each_family(family_dirs: dict[str, Path], family: str) -> None:
    truth, _ = reference_logits(family_dirs[family], QUERY, DOCUMENTS, 512)
    ranked = rank_order(family_dirs[family], QUERY, DOCUMENTS, "--max-length", "512")
    assert ranked == list(np.argsort(truth[:, 0])[::-1])
