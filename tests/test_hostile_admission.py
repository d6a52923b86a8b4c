"""Admission before work, through a real server on loopback: what can be refused is refused before the body
is read, parsed or tokenized; slow or cut-off uploads end cleanly; one huge request cannot get every small one
refused; tokenization is bounded by what is used. Each probe is one of issue 38's reproductions."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from rerankd.settings import ServeSettings

from serving import metric, running_server, wait_until

pytestmark = [pytest.mark.hostile, pytest.mark.slow, pytest.mark.network]

KEY = "admission-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUERY = "Who wrote To Kill a Mockingbird?"
DOCUMENTS = ["To Kill a Mockingbird is a novel by Harper Lee.", "Moby-Dick was written by Herman Melville."]
QUEUE_LIMIT = 64
# The reported body: 53 documents of 100,000 x U+FDFA, 16 MB of JSON, expensive to tokenize whole.
COSTLY = json.dumps({"query": QUERY, "documents": ["\ufdfa" * 100_000] * 53}, ensure_ascii=False).encode()


@pytest.fixture(scope="module")
def server(xsmall_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("admission") / "server.log"
    args = ["--model", f"xsmall={xsmall_model_dir}", "--api-key", KEY, "--body-timeout", "2"]
    args += ["--max-queued-pairs", str(QUEUE_LIMIT), "--max-batch-pairs", "2", "--max-request-pairs", "100"]
    with running_server(args, log) as url:
        yield url, log


def raw_exchange(url: str, head: bytes, body_chunks: Iterable[bytes] = (), pause: float = 0.0) -> bytes:
    """Send `head`, then each chunk `pause` seconds apart while the server has not answered; what the server
    sent back before closing (or within 30 s)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head)
        connection.settimeout(pause or 30)
        answer = b""
        for chunk in body_chunks:
            try:
                answer += connection.recv(65536)
                break  # the server answered: stop sending
            except TimeoutError:
                connection.sendall(chunk)
        connection.settimeout(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                data = connection.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            answer += data
            if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                break
        return answer


def head(path: str, length: int, *extra: str, key: str = KEY) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", "Content-Type: application/json"]
    lines += [f"Content-Length: {length}", f"Authorization: Bearer {key}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post_raw(url: str, body: bytes, timeout: float = 300) -> httpx.Response:
    headers = {**AUTH, "Content-Type": "application/json"}
    return httpx.post(f"{url}/rerank", content=body, headers=headers, timeout=timeout)


def status_and_body(answer: bytes) -> tuple[int, dict]:
    header, _, body = answer.partition(b"\r\n\r\n")
    return int(header.split()[1]), json.loads(body)


def test_a_trickled_body_gets_408_within_the_body_timeout(server: tuple[str, Path]) -> None:
    url, _ = server
    body = json.dumps({"query": QUERY, "documents": DOCUMENTS}).encode()
    answer = raw_exchange(
        url, head("/rerank", len(body)), iter(body[i : i + 1] for i in range(len(body))), 0.5
    )
    status, error = status_and_body(answer)
    assert (
        status == 408 and error["error"]["param"] == "body" and "--body-timeout" in error["error"]["message"]
    )
    assert b"connection: close" in answer.lower()


def test_the_request_timeout_covers_the_upload(xsmall_model_dir: Path, tmp_path: Path) -> None:
    """A body trickled over 30 s against --request-timeout 3 got 200 before."""
    args = ["--model", str(xsmall_model_dir), "--request-timeout", "3", "--body-timeout", "60"]
    with running_server(args, tmp_path / "server.log") as url:
        body = json.dumps({"query": QUERY, "documents": DOCUMENTS}).encode()
        chunks = iter(body[i : i + 1] for i in range(len(body)))
        status, error = status_and_body(raw_exchange(url, head("/rerank", len(body)), chunks, 0.5))
        assert status == 504 and "--request-timeout" in error["error"]["message"]


def test_the_default_request_timeout_is_set() -> None:
    assert ServeSettings().request_timeout == 300


def test_expect_100_continue_past_the_limit_gets_413_not_100(server: tuple[str, Path]) -> None:
    url, _ = server
    answer = raw_exchange(url, head("/rerank", 20 * 1024 * 1024, "Expect: 100-continue"))
    assert not answer.startswith(b"HTTP/1.1 100")
    status, error = status_and_body(answer)
    assert status == 413 and "--max-request-bytes" in error["error"]["message"]


def test_a_large_body_with_a_wrong_key_is_refused_before_it_is_read(server: tuple[str, Path]) -> None:
    """Only the head is sent: the 401 comes without the server waiting for 15 MB, and the connection is closed
    after it (the server does not read and discard the body the client may still send)."""
    url, _ = server
    answer = raw_exchange(url, head("/v1/rerank", 15 * 1024 * 1024, key="wrong"))
    status, error = status_and_body(answer)
    assert status == 401 and "API key" in error["message"]
    assert b"\r\nconnection: close\r\n" in answer.lower()


def test_a_body_cut_off_by_a_disconnect_is_not_scored(server: tuple[str, Path]) -> None:
    url, log = server
    body = json.dumps({"query": QUERY, "documents": ["cut-off document"] * 20}).encode()
    scored = metric(url, "rerankd_batch_pairs_sum", AUTH)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head("/rerank", len(body)) + body[: len(body) // 2])
    wait_until(lambda: '"status": 499' in log.read_text())
    assert metric(url, "rerankd_batch_pairs_sum", AUTH) == scored


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"query": "q", "documents": ["\xff\xfe"]}', "UTF-8"),
        (b'{"query": "q", "documents": ["a"], "top_n": ' + b"9" * 5000 + b"}", "digits"),
        (b'{"query": "q", "documents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    ],
    ids=["invalid-utf8", "long-integer", "deep-nesting"],
)
@pytest.mark.parametrize("route", ["/rerank", "/v1/rerank", "/v2/rerank", "/v1/reranking", "/ai/v1/rerank"])
def test_what_the_json_parser_refuses_is_the_invalid_json_error(
    server: tuple[str, Path], route: str, raw: bytes, reason: str
) -> None:
    url, _ = server
    headers = {**AUTH, "Content-Type": "application/json"}
    response = httpx.post(f"{url}{route}", content=raw, headers=headers, timeout=60)
    assert response.status_code == 400, response.text
    text = response.text
    assert "not valid JSON" in text and reason in text
    if route == "/rerank":
        assert (
            response.json()["error"]["type"] == "invalid_json" and response.json()["error"]["param"] == "body"
        )


def test_one_huge_request_does_not_get_the_small_ones_refused(server: tuple[str, Path]) -> None:
    """A request as large as the queue holds, then 23 small ones at once: each small one is within its fair
    share and gets 200; a second large one is past its share and gets 429, before it is tokenized."""
    url, _ = server
    big = {"query": QUERY, "documents": [f"passage number {n} about novels" for n in range(QUEUE_LIMIT)]}
    with ThreadPoolExecutor(max_workers=24) as pool:
        first = pool.submit(httpx.post, f"{url}/rerank", json=big, headers=AUTH, timeout=120)
        wait_until(lambda: metric(url, "rerankd_queued_pairs", AUTH) > QUEUE_LIMIT // 2, poll_seconds=0.01)
        second = httpx.post(f"{url}/rerank", json=big, headers=AUTH, timeout=120)
        small = {"query": QUERY, "documents": DOCUMENTS}
        smalls = [
            pool.submit(httpx.post, f"{url}/rerank", json=small, headers=AUTH, timeout=120) for _ in range(23)
        ]
        statuses = [future.result().status_code for future in smalls]
        assert first.result().status_code == 200
    assert second.status_code == 429 and "fair share" in second.json()["error"]["message"]
    assert second.headers["retry-after"] and "x-tokenization-time" not in second.headers
    assert statuses == [200] * 23


def test_chunk_mode_pairs_are_capped_per_request(server: tuple[str, Path], msmarco_dir: Path) -> None:
    """280 KB of text in chunk mode made 640 pairs with no cap; past --max-request-pairs it is 413."""
    url, _ = server
    with (msmarco_dir / "corpus.jsonl").open() as corpus:
        text = " ".join(json.loads(line)["text"] for _, line in zip(range(600), corpus, strict=False))
    body = {
        "query": QUERY,
        "documents": [text[:90_000]] * 3,
        "long_documents": "chunk",
        "max_chunks_per_doc": 64,
    }
    response = httpx.post(f"{url}/rerank", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["param"] == "documents" and "--max-request-pairs" in error["message"]


def test_costly_to_tokenize_bodies_cost_only_what_is_used(server: tuple[str, Path]) -> None:
    """53 documents of 100k x U+FDFA (16 MB) cost 13.4 s of tokenization and made a normal request wait 26 s:
    two of them at once, and a normal request beside them, all answered (timings printed, not asserted)."""
    url, _ = server
    with ThreadPoolExecutor(max_workers=2) as pool:
        attacks = [pool.submit(post_raw, url, COSTLY) for _ in range(2)]
        started = time.perf_counter()
        normal = httpx.post(
            f"{url}/rerank", json={"query": QUERY, "documents": DOCUMENTS}, headers=AUTH, timeout=300
        )
        waited = time.perf_counter() - started
        answers = [future.result() for future in attacks]
    assert normal.status_code == 200
    assert {answer.status_code for answer in answers} <= {200, 429, 503}
    tokenization = [
        float(answer.headers["x-tokenization-time"]) for answer in answers if answer.status_code == 200
    ]
    print(
        f"\nhostile bodies: {[a.status_code for a in answers]}, tokenization {tokenization} ms; "
        f"normal request {waited:.2f} s"
    )


def test_a_client_that_hangs_up_stops_its_tokenization(server: tuple[str, Path]) -> None:
    url, log = server
    with pytest.raises(httpx.ReadTimeout):
        post_raw(url, COSTLY, timeout=0.3)
    wait_until(lambda: metric(url, "rerankd_queued_pairs", AUTH) == 0)
    wait_until(lambda: log.read_text().count('"status": 499') >= 1)


def test_twenty_large_bodies_at_once_are_bounded_by_the_bytes_in_flight(
    xsmall_model_dir: Path, tmp_path: Path
) -> None:
    """Twenty 15 MB bodies stalled /health for 4 s and peaked at 2.45 GB. With a 3 MB request of 1,000
    full-length documents being scored (minutes of work, even in bf16 on AMX) and --max-body-bytes-in-flight
    at 15 MB, each waits 2 s (the body timeout here) for room, unread, then gets 503 and its connection
    closed; /health answers meanwhile (figures printed)."""
    args = ["--model", f"xsmall={xsmall_model_dir}", "--api-key", KEY, "--body-timeout", "2"]
    args += ["--max-body-bytes-in-flight", str(15 * 2**20), "--max-batch-pairs", "2"]
    holder = json.dumps({"query": QUERY, "documents": ["word " * 600] * 1000}).encode()
    body = json.dumps({"query": QUERY, "documents": ["word " * 20_000] * 140}).encode()
    with running_server(args, tmp_path / "server.log") as url, ThreadPoolExecutor(max_workers=21) as pool:
        resident_before = metric(url, "process_resident_memory_bytes", AUTH)
        # Its bytes stay in flight until its client gives up, long before it could be scored.
        held = pool.submit(post_raw, url, holder, 15)
        wait_until(lambda: metric(url, "rerankd_queued_pairs", AUTH) > 0)
        posts = [pool.submit(post_raw, url, body) for _ in range(20)]
        started = time.perf_counter()
        health = httpx.get(f"{url}/health", timeout=60)
        health_seconds = time.perf_counter() - started
        answers = [future.result() for future in posts]
        resident_after = metric(url, "process_resident_memory_bytes", AUTH)
        with pytest.raises(httpx.ReadTimeout):
            held.result()
    assert health.status_code == 200
    assert [answer.status_code for answer in answers] == [503] * 20
    assert all("--max-body-bytes-in-flight" in answer.json()["error"]["message"] for answer in answers)
    assert all(answer.headers["connection"] == "close" for answer in answers)
    print(
        f"\n20 x {len(body) / 2**20:.0f} MB bodies beside a {len(holder) / 2**20:.0f} MB one: 503 each; "
        f"/health in {health_seconds:.2f} s; RSS {resident_before / 2**20:.0f} MB before, "
        f"{resident_after / 2**20:.0f} MB after"
    )
