"""Broken models and readiness: a model with NaN weights, a config.json with absurd sizes, a model that failed
to load for good beside one that serves, and what `/ready` tells a client without the key.

The broken models are copies of the random-weight fixture: one weight set to NaN, or config.json edited.
Servers are real `rerankd serve` processes on loopback; the rest runs in process.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from rerankd.api.app import create_app
from rerankd.backends.base import ModelLoadError
from rerankd.bench.processes import ServerProcess, free_port, running_process
from rerankd.devtools.random_causal import write_random_causal
from rerankd.devtools.random_encoders import write_random_encoder
from rerankd.engine.loader import load_engine
from rerankd.engine.models import ServedModels
from rerankd.settings import ServeSettings

from conftest import load_backend_at
from serving import wait_until

pytestmark = [pytest.mark.hostile]

QUERY = "Who wrote To Kill a Mockingbird?"
DOCUMENTS = ["To Kill a Mockingbird is a novel by Harper Lee.", "Moby-Dick was written by Herman Melville."]
KEY = "hostile-models-key"
ABSURD_POSITIONS = 100_000_000
# Sizes no checkpoint backs; before they were refused, the first cost a DeBERTa load 10.9 GB and 75 s.
ABSURD_SIZES = {
    "max_position_embeddings": ABSURD_POSITIONS,
    "vocab_size": 1_000_000_000,
    "hidden_size": 4_000_000,
    "num_hidden_layers": 100_000,
}
# A server holding the random xsmall model peaks near 1 GB; allocating for 1e8 positions took 10.9 GB.
PEAK_RSS_BOUND = 2 * 1024**3


def with_config(source: Path, target: Path, **changes: int) -> Path:
    """`source`'s model with config.json's `changes`: its other files linked, not copied."""
    target.mkdir()
    for file in source.iterdir():
        if file.name != "config.json":
            (target / file.name).symlink_to(file)
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | changes))
    return target


def with_nan_weight(source: Path, target: Path) -> Path:
    """A copy of `source`'s model with one weight of its classifier NaN: every logit is NaN then."""
    shutil.copytree(source, target)
    checkpoint = target / "model.safetensors"
    tensors = load_file(checkpoint)
    tensors["classifier.weight"][0, 0] = float("nan")
    save_file(tensors, str(checkpoint), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def nan_model_dir(xsmall_model_dir: Path, module_folder: Callable[[str], Path]) -> Path:
    return with_nan_weight(xsmall_model_dir, module_folder("nan") / "model")


@pytest.fixture(scope="module")
def absurd_model_dir(xsmall_model_dir: Path, module_folder: Callable[[str], Path]) -> Path:
    target = module_folder("absurd") / "model"
    return with_config(xsmall_model_dir, target, max_position_embeddings=ABSURD_POSITIONS)


# --- non-finite logits ------------------------------------------------------------------------------------


def test_a_model_with_nan_weights_fails_its_warm_up(nan_model_dir: Path) -> None:
    models = ServedModels.pending([("nan", str(nan_model_dir))])
    models.load_all(lambda name, reference: load_engine(reference, served_name=name))
    [slot] = models.slots()
    assert slot.state == "failed" and slot.engine is None
    assert slot.error == "model 'nan' produced non-finite scores (NaN or infinity): its weights are broken"
    readiness = models.readiness()
    assert readiness.status == "failed" and not readiness.takes_traffic and not readiness.may_change


def test_non_finite_scores_served_without_warm_up_are_an_error_not_null(nan_model_dir: Path) -> None:
    engine = load_engine(str(nan_model_dir), served_name="nan")  # as with --no-warmup: never checked
    with TestClient(create_app(ServedModels.of([engine]), ServeSettings())) as client:
        response = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS})
    assert response.status_code == 500 and "relevance_score" not in response.text
    assert "non-finite scores" in response.json()["error"]["message"]


# --- absurd sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), ABSURD_SIZES.items(), ids=list(ABSURD_SIZES))
def test_a_config_with_absurd_sizes_is_refused_naming_the_field(
    xsmall_model_dir: Path, tmp_path: Path, key: str, value: int
) -> None:
    folder = with_config(xsmall_model_dir, tmp_path / "model", **{key: value})
    with pytest.raises(ModelLoadError, match=f"the model config's {key} is {value}, .* refused before"):
        load_backend_at(folder, device="cpu")


@pytest.fixture(scope="module")
def other_family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random model of a family `transformers` runs, and of an LLM reranker."""
    return {
        "bert": write_random_encoder(tmp_path_factory.mktemp("bert"), "bert"),
        "qwen3-reranker": write_random_causal(tmp_path_factory.mktemp("qwen3"), "qwen3-reranker"),
    }


@pytest.mark.slow  # trains two tokenizers
@pytest.mark.parametrize("family", ["bert", "qwen3-reranker"])
def test_every_family_refuses_absurd_positions(
    other_family_dirs: dict[str, Path], tmp_path: Path, family: str
) -> None:
    folder = with_config(
        other_family_dirs[family], tmp_path / "model", max_position_embeddings=ABSURD_POSITIONS
    )
    with pytest.raises(ModelLoadError, match=f"max_position_embeddings is {ABSURD_POSITIONS}, more than"):
        load_backend_at(folder, device="cpu")


# --- a model still loading --------------------------------------------------------------------------------


def test_a_model_still_loading_answers_503_with_retry_after() -> None:
    models = ServedModels.pending([("later", "never loaded here")])
    with TestClient(create_app(models, ServeSettings())) as client:
        response = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "still loading" in response.json()["error"]["message"]
        ready = client.get("/ready")
    assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
    assert ready.json() == {"status": "loading", "ready": [], "pending": ["later"], "failed": {}}


# --- a server with a good model and two broken ones -------------------------------------------------------

AUTHORIZED = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(
    xsmall_model_dir: Path,
    nan_model_dir: Path,
    absurd_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    """`rerankd serve` with a key, the xsmall model and the two broken ones, once every model has loaded or
    failed (the process itself, to read its peak RSS)."""
    port = free_port()
    models = [f"good={xsmall_model_dir}", f"nan={nan_model_dir}", f"absurd={absurd_model_dir}"]
    command = [sys.executable, "-m", "rerankd", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += [argument for model in models for argument in ("--model", model)]
    command += ["--api-key", KEY]
    log = tmp_path_factory.mktemp("server") / "server.log"
    url = f"http://127.0.0.1:{port}"
    with running_process(command, url, log, env={"HF_HUB_OFFLINE": "1"}, ready_path="/health") as process:
        wait_until(lambda: httpx.get(f"{url}/ready", headers=AUTHORIZED).json()["pending"] == [])
        yield process


@pytest.mark.slow
@pytest.mark.network
def test_ready_is_200_degraded_and_names_the_failed_models_to_a_key_holder(server: ServerProcess) -> None:
    ready = httpx.get(f"{server.base_url}/ready", headers=AUTHORIZED)
    assert ready.status_code == 200 and "retry-after" not in ready.headers
    body = ready.json()
    assert (body["status"], body["ready"], body["pending"]) == ("degraded", ["good"], [])
    assert "non-finite scores" in body["failed"]["nan"]
    assert f"max_position_embeddings is {ABSURD_POSITIONS}" in body["failed"]["absurd"]
    served = httpx.post(
        f"{server.base_url}/rerank",
        json={"model": "good", "query": QUERY, "documents": DOCUMENTS},
        headers=AUTHORIZED,
        timeout=60,
    )
    assert served.status_code == 200 and len(served.json()["results"]) == 2


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", f"Basic {KEY}"])
def test_ready_without_the_key_says_only_the_status(server: ServerProcess, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    ready = httpx.get(f"{server.base_url}/ready", headers=headers)
    assert ready.status_code == 200 and ready.json() == {"status": "degraded"}


# Each dialect's route and body naming the model that failed to load.
FAILED_MODEL_REQUESTS = {
    "rerankd": ("/rerank", {"model": "nan", "query": QUERY, "documents": DOCUMENTS}),
    "tei": ("/rerank", {"model": "nan", "query": QUERY, "texts": DOCUMENTS}),
    "cohere v2": ("/v2/rerank", {"model": "nan", "query": QUERY, "documents": DOCUMENTS}),
    "mixedbread": ("/v1/reranking", {"model": "absurd", "query": QUERY, "input": DOCUMENTS}),
}


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("dialect", FAILED_MODEL_REQUESTS)
def test_a_model_that_failed_to_load_answers_503_without_retry_after(
    server: ServerProcess, dialect: str
) -> None:
    path, body = FAILED_MODEL_REQUESTS[dialect]
    response = httpx.post(f"{server.base_url}{path}", json=body, headers=AUTHORIZED, timeout=60)
    assert response.status_code == 503 and "retry-after" not in response.headers
    assert "will not become available until the server restarts" in response.text
    assert "non-finite" not in response.text and "max_position" not in response.text  # the reason: /ready


@pytest.mark.slow
@pytest.mark.network
def test_the_absurd_config_allocated_nothing(server: ServerProcess) -> None:
    peak = server.peak_rss()
    assert peak is not None and peak < PEAK_RSS_BOUND, f"peak RSS {peak / 1024**3:.1f} GiB"
