"""The production server through real processes on loopback: several models, readiness, auth, limits,
timeouts, disconnects, metrics, request ids and logs, injected faults, load, memory, and graceful shutdown.

All traffic goes to loopback; every loop is bounded in count and time.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cohere
import httpx
import pytest

from rerankd.backends.heap import HeapTrimmer
from rerankd.bench.processes import free_port, running_process

from serving import metric, running_server, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.network]  # real server processes on loopback

QUERY = "Who wrote To Kill a Mockingbird?"
DOCUMENTS = ["To Kill a Mockingbird is a novel by Harper Lee.", "Moby-Dick was written by Herman Melville."]
KEYS = ("first-key", "second-key")
FAULT_MARKER = "zqxfaultzqx"


def passages(msmarco_dir: Path, count: int, words: int | None = None) -> list[str]:
    with (msmarco_dir / "corpus.jsonl").open() as corpus:
        texts = [json.loads(line)["text"] for line in itertools.islice(corpus, count)]
    return [" ".join(text.split()[:words]) for text in texts] if words else texts


# --- several models, readiness ----------------------------------------------------------------------------


def test_several_models_route_by_name_and_a_broken_one_leaves_ready_degraded(
    xsmall_model_dir: Path, tmp_path: Path
) -> None:
    args = ["--model", f"first={xsmall_model_dir}", "--model", "broken=/nonexistent/model"]
    args += ["--model", f"second={xsmall_model_dir}"]
    with running_server(args, tmp_path / "server.log", ready_path="/health") as url:
        wait_until(lambda: not httpx.get(f"{url}/ready").json()["pending"])
        ready = httpx.get(f"{url}/ready")  # the models that loaded serve: the pod takes traffic
        assert ready.status_code == 200 and "retry-after" not in ready.headers
        assert ready.json()["status"] == "degraded" and ready.json()["ready"] == ["first", "second"]
        assert "/nonexistent/model" in ready.json()["failed"]["broken"]
        for name in ("first", "second", None):
            body = {"query": QUERY, "documents": DOCUMENTS} | ({"model": name} if name else {})
            response = httpx.post(f"{url}/rerank", json=body, timeout=60)
            assert response.status_code == 200 and response.json()["model"] == (name or "first")
        broken = httpx.post(
            f"{url}/v2/rerank", json={"model": "broken", "query": QUERY, "documents": DOCUMENTS}
        )
        assert broken.status_code == 503 and "failed to load" in broken.json()["message"]
        assert "retry-after" not in broken.headers  # no retry helps until the server restarts
        listed = httpx.get(f"{url}/v1/models").json()
        assert listed["object"] == "list" and [card["id"] for card in listed["data"]] == [
            "first",
            "broken",
            "second",
        ]
        models = {model["name"]: model for model in httpx.get(f"{url}/models").json()}
        assert models["first"]["state"] == "ready" and models["first"]["backend"] == "torch"
        assert models["first"]["dtype"] == "float32" and models["first"]["max_length"] == 512
        assert models["broken"]["state"] == "failed" and models["broken"]["error"]


def test_a_server_whose_only_model_fails_exits_with_an_error(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "rerankd", "serve", "--model", "/nonexistent/model", "--port", str(port)]
    log = tmp_path / "server.log"
    with (
        pytest.raises(RuntimeError, match="exited with 1"),
        running_process(command, f"http://127.0.0.1:{port}", log, ready_path="/ready"),
    ):
        pass
    assert "no model could be loaded" in log.read_text()


# --- auth, limits, metrics, request ids, logs -------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(xsmall_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("guarded") / "server.log"
    args = ["--model", f"xsmall={xsmall_model_dir}", "--api-key", KEYS[0], "--api-key", KEYS[1]]
    args += ["--metrics-auth", "--max-request-bytes", "4096", "--max-document-chars", "200"]
    args += ["--cors-origin", "https://app.example"]
    with running_server(args, log) as url:
        yield url, log


PROTECTED = [
    ("POST", "/rerank", {"query": QUERY, "documents": DOCUMENTS}),
    ("POST", "/rerank", {"query": QUERY, "texts": DOCUMENTS}),
    ("POST", "/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}),
    ("POST", "/v2/rerank", {"model": "xsmall", "query": QUERY, "documents": DOCUMENTS}),
    ("POST", "/v1/reranking", {"query": QUERY, "input": DOCUMENTS}),
    ("POST", "/ai/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}),
    ("GET", "/info", None),
    ("GET", "/models", None),
    ("GET", "/v1/models", None),
    ("GET", "/metrics", None),
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_every_protected_route_needs_a_key(guarded: tuple[str, Path], method: str, path: str, body) -> None:
    url, _ = guarded
    for headers, status in (
        ({}, 401),
        ({"Authorization": "Bearer wrong-key"}, 401),
        ({"Authorization": f"Basic {KEYS[0]}"}, 401),
        ({"Authorization": f"Bearer {KEYS[0]}"}, 200),
        ({"Authorization": f"Bearer {KEYS[1]}"}, 200),
    ):
        response = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=60)
        assert response.status_code == status, (headers, response.text)
        if status == 401:
            assert response.headers["www-authenticate"] == "Bearer"
            assert "API key" in response.text and KEYS[0] not in response.text


def test_health_and_ready_stay_open(guarded: tuple[str, Path]) -> None:
    url, _ = guarded
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/ready").json()["status"] == "ready"


def test_cohere_client_sends_its_key(guarded: tuple[str, Path]) -> None:
    url, _ = guarded
    response = cohere.ClientV2(api_key=KEYS[1], base_url=url).rerank(
        model="xsmall", query=QUERY, documents=DOCUMENTS
    )
    assert [result.index for result in response.results] != []
    with pytest.raises(cohere.core.api_error.ApiError) as refused:
        cohere.ClientV2(api_key="wrong", base_url=url).rerank(
            model="xsmall", query=QUERY, documents=DOCUMENTS
        )
    assert refused.value.status_code == 401


def test_body_and_document_size_limits(guarded: tuple[str, Path]) -> None:
    url, _ = guarded
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    big = {"model": "xsmall", "query": QUERY, "documents": ["word " * 30] * 40}
    too_big = httpx.post(f"{url}/v2/rerank", json=big, headers=auth)
    assert too_big.status_code == 413 and "--max-request-bytes" in too_big.json()["message"]
    long_document = httpx.post(
        f"{url}/rerank", json={"query": QUERY, "documents": ["ok", "x" * 201]}, headers=auth
    )
    assert long_document.status_code == 413
    assert long_document.json()["error"]["param"] == "documents.1"
    tei = httpx.post(f"{url}/rerank", json={"query": "q" * 201, "texts": ["ok"]}, headers=auth)
    assert (
        tei.status_code == 413 and tei.json()["error_type"] == "Validation" and "query" in tei.json()["error"]
    )


def test_cors_answers_the_allowed_origin_only(guarded: tuple[str, Path]) -> None:
    url, _ = guarded
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = httpx.options(f"{url}/rerank", headers={"Origin": "https://app.example", **preflight})
    assert allowed.headers.get("access-control-allow-origin") == "https://app.example"
    other = httpx.options(f"{url}/rerank", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_request_ids_timing_headers_metrics_and_one_log_line_without_bodies(
    guarded: tuple[str, Path],
) -> None:
    url, log = guarded
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    secret_document = "the secret document text nobody should log"
    response = httpx.post(
        f"{url}/rerank",
        json={"query": QUERY, "documents": [secret_document, DOCUMENTS[0]]},
        headers={**auth, "X-Request-ID": "trace-1234"},
        timeout=60,
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-1234"
    for header in ("x-total-time", "x-inference-time", "x-queue-time", "x-tokenization-time"):
        assert float(response.headers[header]) >= 0
    assert int(response.headers["x-compute-tokens"]) == response.json()["usage"]["total_tokens"]
    generated = httpx.get(f"{url}/health").headers["x-request-id"]
    assert len(generated) == 32 and generated != "trace-1234"
    assert (
        httpx.get(f"{url}/health", headers={"X-Request-ID": "bad id; <x>"}).headers["x-request-id"]
        != "bad id; <x>"
    )

    wait_until(lambda: "trace-1234" in log.read_text())
    lines = [json.loads(line) for line in log.read_text().splitlines() if "trace-1234" in line]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["route"] == "/rerank" and entry["status"] == 200 and entry["model"] == "xsmall"
    assert entry["pairs"] == 2 and entry["tokens"] > 0 and entry["queue_ms"] >= 0 and entry["compute_ms"] > 0
    assert secret_document not in log.read_text() and QUERY not in log.read_text()

    assert metric(url, 'rerankd_requests_total{route="/rerank",status="200"}', auth) >= 1
    assert metric(url, 'rerankd_requests_total{route="/rerank",status="401"}', auth) >= 0
    assert metric(url, 'rerankd_batch_pairs_count{model="xsmall"}', auth) >= 1
    assert metric(url, 'rerankd_batch_padding_ratio_count{model="xsmall"}', auth) >= 1
    assert metric(url, 'rerankd_model_load_seconds{model="xsmall"}', auth) > 0
    assert metric(url, 'rerankd_queued_pairs{model="xsmall"}', auth) == 0
    assert metric(url, 'rerankd_request_duration_seconds_count{route="/rerank"}', auth) >= 1


# --- timeouts and disconnects drop queued work ------------------------------------------------------------


@pytest.fixture(scope="module")
def slow(xsmall_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("slow") / "server.log"
    args = ["--model", f"xsmall={xsmall_model_dir}", "--request-timeout", "2", "--max-batch-pairs", "2"]
    with running_server(args, log) as url:
        yield url


def test_a_timed_out_request_gets_504_and_its_queued_work_is_dropped(slow: str, msmarco_dir: Path) -> None:
    response = httpx.post(
        f"{slow}/rerank", json={"query": QUERY, "documents": passages(msmarco_dir, 400)}, timeout=120
    )
    assert response.status_code == 504 and "--request-timeout" in response.json()["error"]["message"]
    wait_until(lambda: metric(slow, "rerankd_queued_pairs") == 0, seconds=10)
    assert (
        httpx.post(f"{slow}/rerank", json={"query": QUERY, "documents": DOCUMENTS}, timeout=60).status_code
        == 200
    )


def test_a_client_that_disconnects_has_its_queued_pairs_dropped(slow: str, msmarco_dir: Path) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{slow}/v1/rerank", json={"query": QUERY, "documents": passages(msmarco_dir, 300)}, timeout=0.5
        )
    wait_until(lambda: metric(slow, "rerankd_queued_pairs") == 0, seconds=5)
    handled = metric(slow, 'rerankd_requests_total{route="/v1/rerank",status="499"}')
    assert handled == 1


# --- injected faults --------------------------------------------------------------------------------------


def test_a_failing_forward_fails_only_its_batch(xsmall_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(xsmall_model_dir), "--max-batch-pairs", "1"]
    with running_server(args, tmp_path / "server.log", fault_marker=FAULT_MARKER) as url:
        poisoned = {"query": QUERY, "documents": [f"a {FAULT_MARKER} document", DOCUMENTS[0]]}
        healthy = {"query": QUERY, "documents": DOCUMENTS}
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [
                pool.submit(httpx.post, f"{url}/rerank", json=body, timeout=60)
                for body in (healthy, poisoned, healthy, healthy)
            ]
            responses = [future.result() for future in futures]
        assert [response.status_code for response in responses] == [200, 500, 200, 200]
        error = responses[1].json()["error"]
        assert error == {
            "message": "internal server error",
            "type": "internal_error",
            "param": None,
            "code": 500,
        }
        v2 = httpx.post(f"{url}/v2/rerank", json={"model": str(xsmall_model_dir), **poisoned}, timeout=60)
        assert v2.status_code == 500 and v2.json() == {"message": "internal server error"}
        assert httpx.post(f"{url}/rerank", json=healthy, timeout=60).status_code == 200
        assert (
            "Traceback" in (tmp_path / "server.log").read_text()
        )  # the server logs it; clients never see it


# --- load ------------------------------------------------------------------------------------------------


def test_32_clients_times_50_requests_get_complete_ordered_results(
    xsmall_model_dir: Path, msmarco_dir: Path, tmp_path: Path
) -> None:
    """Every response complete, sorted, and within 1e-3 of the same request sent alone; no 5xx; the queue
    back to empty. Reports whether scores were also bit-identical (batch composition changes the padding)."""
    rng = random.Random(7)
    texts = passages(msmarco_dir, 200, words=12)
    requests = [{"query": QUERY, "documents": rng.sample(texts, rng.randint(1, 8))} for _ in range(40)]
    plan = [[rng.randrange(len(requests)) for _ in range(50)] for _ in range(32)]
    args = ["--model", str(xsmall_model_dir), "--max-batch-pairs", "32"]
    with running_server(args, tmp_path / "server.log") as url:
        alone = [httpx.post(f"{url}/rerank", json=request, timeout=60).json() for request in requests]

        def client(picks: list[int]) -> list[tuple[int, int, dict]]:
            outcomes = []
            with httpx.Client(timeout=120) as session:
                for pick in picks:
                    response = session.post(f"{url}/rerank", json=requests[pick])
                    outcomes.append((pick, response.status_code, response.json()))
            return outcomes

        with ThreadPoolExecutor(max_workers=32) as pool:
            outcomes = [item for result in pool.map(client, plan) for item in result]
        queued = metric(url, "rerankd_queued_pairs")
    assert len(outcomes) == 32 * 50
    assert {status for _, status, _ in outcomes} == {200}
    worst = 0.0
    identical = True
    for pick, _, body in outcomes:
        results = body["results"]
        scores = [result["relevance_score"] for result in results]
        assert sorted(result["index"] for result in results) == list(range(len(requests[pick]["documents"])))
        assert scores == sorted(scores, reverse=True)
        expected = {result["index"]: result["relevance_score"] for result in alone[pick]["results"]}
        for result in results:
            difference = abs(result["relevance_score"] - expected[result["index"]])
            worst = max(worst, difference)
            identical &= difference == 0
    assert worst <= 1e-3
    assert queued == 0
    print(f"\nload: max |score under load - score alone| = {worst:.2e}; bit-identical: {identical}")


def test_memory_stays_bounded_across_many_batch_shapes(xsmall_model_dir: Path, tmp_path: Path) -> None:
    """Each new batch shape gets its own oneDNN kernels, and the heap fragments around them: requests of 150
    distinct lengths must not grow the server's peak RSS much past what the first 50 reached (unbounded
    caches and an untrimmed heap grew it by about 390 MB)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "rerankd", "serve", "--model", str(xsmall_model_dir)]
    command += ["--port", str(port), "--dtype", "float32"]
    peaks = []
    with (
        running_process(command, url, tmp_path / "server.log", ready_path="/ready") as server,
        httpx.Client(timeout=60) as session,
    ):
        for words in range(3, 453, 3):  # one pair a request: one batch of a new length each time
            body = {"query": QUERY, "documents": [" ".join(["alpha"] * words)]}
            assert session.post(f"{url}/rerank", json=body).status_code == 200
            peaks.append(server.peak_rss())
    growth = peaks[-1] - peaks[49]
    print(f"\npeak RSS after 50 lengths {peaks[49] / 2**20:.0f} MB, after 150 {peaks[-1] / 2**20:.0f} MB")
    assert growth < 150 * 2**20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_the_heap_trimmer_reaches_glibc() -> None:
    assert HeapTrimmer().available


# Twelve rounds of a batch's activations (12-40 MB), allocated, written and freed: the page faults of the last
# four. The first rounds settle the heap (blocks freed next to small ones in use are not merged at once).
# Transparent huge pages are off in the probe (prctl PR_SET_THP_DISABLE): where the kernel backs mappings
# with them always, a fresh mapping faults 2 MB at a time and the count would not show it.
REFAULTS = """
import ctypes, resource, sys, torch
from rerankd.backends.heap import keep_activations_in_heap
PR_SET_THP_DISABLE = 41  # from linux/prctl.h
assert ctypes.CDLL(None).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0
print(keep_activations_in_heap() if sys.argv[1] == "keep" else None)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.empty(size * 2**20, dtype=torch.uint8).fill_(1) for size in (12, 14, 25, 40)]
    del activations
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-4:]))
"""


def refaults(mode: str, environment: dict[str, str] | None = None) -> tuple[str, int]:
    """(what `keep_activations_in_heap` returned, page faults of the repeated rounds), in a fresh process."""
    probe = subprocess.run(
        [sys.executable, "-c", REFAULTS, mode], capture_output=True, text=True, timeout=120, env=environment
    )
    assert probe.returncode == 0, probe.stderr
    kept, faults = probe.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_activations_serve_the_next_batch_without_page_faults() -> None:
    """glibc gives a block this size its own mapping and unmaps it when freed, so each batch faults its pages
    in anew (at least the 40 MB block's 10,240 a round); kept in the heap, later rounds reuse them."""
    plain_kept, plain = refaults("plain")
    kept, reused = refaults("keep")
    assert (plain_kept, kept) == ("None", "True")
    assert plain > 4 * 10_000 and reused < 500, (plain, reused)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_users_allocator_settings_stand() -> None:
    kept, faults = refaults("keep", {**os.environ, "MALLOC_TRIM_THRESHOLD_": str(2**20)})
    assert kept == "False" and faults > 4 * 10_000


# --- lifecycle --------------------------------------------------------------------------------------------


def test_sigterm_lets_in_flight_requests_finish_then_exits_0(
    xsmall_model_dir: Path, msmarco_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "rerankd",
        "serve",
        "--model",
        str(xsmall_model_dir),
        "--port",
        str(port),
    ]
    # Four pairs a batch: the request's 300 pairs stay queued for many batches.
    command += ["--shutdown-timeout", "60", "--max-batch-pairs", "4"]
    with running_process(command, url, tmp_path / "server.log", ready_path="/ready") as server:
        result: dict[str, httpx.Response] = {}
        body = {"query": QUERY, "documents": passages(msmarco_dir, 300)}
        worker = threading.Thread(
            target=lambda: result.update(response=httpx.post(f"{url}/rerank", json=body, timeout=120))
        )
        worker.start()
        wait_until(lambda: metric(url, "rerankd_queued_pairs") > 0, poll_seconds=0.01)  # in flight
        server.process.send_signal(signal.SIGTERM)
        worker.join(timeout=120)
        assert result["response"].status_code == 200 and len(result["response"].json()["results"]) == 300
        assert server.process.wait(timeout=60) == 0
