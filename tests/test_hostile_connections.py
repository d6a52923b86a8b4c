"""Connections and the process's lifecycle under hostile or unlucky traffic, through real `rerankd serve`
processes on loopback: idle, trickling and kept-alive connections are closed on time; a flood of idle
connections under a 1,024 open-files limit is capped with a JSON 503, logs a line or two and never locks a
normal client out for good; SIGTERM while a model loads exits 0; requests still running when the shutdown
grace runs out get their route's 503. Each probe is one of issue 38's reproductions."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from rerankd.bench.processes import free_port, stop_process

from serving import STARTUP_SECONDS, metric, running_server, wait_until

pytestmark = [pytest.mark.hostile, pytest.mark.slow, pytest.mark.network]

QUERY = "Who wrote To Kill a Mockingbird?"
DOCUMENTS = ["To Kill a Mockingbird is a novel by Harper Lee.", "Moby-Dick was written by Herman Melville."]
SERVER_LIMIT = 1024  # the open-files limit of issue 38's report
FLOOD = 1100  # idle connections: more than the limit


@pytest.fixture(scope="module")
def server(xsmall_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("connections") / "server.log"
    args = ["--model", str(xsmall_model_dir), "--header-timeout", "1", "--keep-alive-timeout", "1"]
    with running_server(args, log) as url:
        yield url


@contextlib.contextmanager
def serve_process(
    args: list[str], log_path: Path, open_files: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`rerankd serve` on a free loopback port, not waited for; stopped (or killed) at the end. With
    `open_files`, under that open-files limit, soft and hard, so that the server cannot raise it."""
    port = free_port()
    command = [sys.executable, "-m", "rerankd", "serve", "--host", "127.0.0.1", "--port", str(port), *args]

    def limit_open_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=limit_open_files
        )
        try:
            yield f"http://127.0.0.1:{port}", process
        finally:
            stop_process(process, seconds=30)


def wait_ready(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    def ready() -> bool:
        assert process.poll() is None, log_path.read_text()
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{url}/ready", timeout=1).status_code == 200
        return False

    wait_until(ready, seconds=STARTUP_SECONDS)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def flood(url: str, count: int) -> list[socket.socket]:
    """`count` connections, opened 32 at a time: one by one, each SYN the full accept queue drops costs a
    second."""
    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(lambda _: connect(url), range(count)))


def read_until_closed(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded: 30 s without a byte)."""
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while data := connection.recv(65536):
            answer += data
    return answer


def receive(connection: socket.socket) -> bytes:
    data = connection.recv(65536)
    assert data, "the server closed the connection"
    return data


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers


def read_response(connection: socket.socket) -> bytes:
    """One response with a `Content-Length` body, the connection left open."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += receive(connection)
    head, _, body = answer.partition(b"\r\n\r\n")
    while len(body) < int(parse_head(head)[1]["content-length"]):
        body += receive(connection)
    return head + b"\r\n\r\n" + body


def status_headers_body(answer: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return (*parse_head(head), json.loads(body))


def trickle(connection: socket.socket, lines: list[bytes], pause: float) -> bytes:
    """Send `lines` one at a time, `pause` seconds apart, until the server answers or closes; what it sent."""
    connection.settimeout(pause)
    for line in lines:
        try:
            answer = connection.recv(65536)
        except TimeoutError:
            connection.sendall(line)
            continue
        connection.settimeout(30)
        return answer + read_until_closed(connection)
    raise AssertionError("the server let a trickled head go on")


HEADER_LINES = [f"X-Trickle-{number}: {'a' * 20}\r\n".encode() for number in range(100)]


# --- timeouts ---------------------------------------------------------------------------------------------


def test_an_idle_connection_is_closed_after_the_header_timeout(server: str) -> None:
    with connect(server) as connection:
        assert read_until_closed(connection) == b""  # closed without a word: no request was begun


def test_trickled_headers_get_408_and_the_connection_is_closed(server: str) -> None:
    with connect(server) as connection:
        connection.sendall(b"POST /rerank HTTP/1.1\r\nHost: localhost\r\n")
        answer = trickle(connection, HEADER_LINES, pause=0.2)
    status, headers, body = status_headers_body(answer)
    assert status == 408 and headers["connection"] == "close"
    assert body["error"]["type"] == "timeout" and "--header-timeout" in body["error"]["message"]


def test_a_kept_alive_connection_serves_requests_then_closes_when_idle(server: str) -> None:
    with connect(server) as connection:
        for _ in range(2):
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_response(connection).startswith(b"HTTP/1.1 200")
        assert read_until_closed(connection) == b""  # past --keep-alive-timeout


def test_a_next_request_trickled_on_a_kept_alive_connection_gets_408(server: str) -> None:
    """Each byte resets uvicorn's keep-alive timer, so without the header timeout a client trickling its next
    request's head would hold the connection for good."""
    with connect(server) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(connection).startswith(b"HTTP/1.1 200")
        connection.sendall(b"GET /health HTTP/1.1\r\n")
        answer = trickle(connection, HEADER_LINES, pause=0.2)
    assert answer.startswith(b"HTTP/1.1 408")


# --- the connection cap -----------------------------------------------------------------------------------


@pytest.fixture
def flood_room() -> None:
    """The test process's own open-files limit, raised to hold the flood."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * FLOOD
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the open-files hard limit ({hard}) cannot hold {FLOOD} connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def rerank(url: str) -> httpx.Response:
    return httpx.post(f"{url}/rerank", json={"query": QUERY, "documents": DOCUMENTS}, timeout=30)


def test_idle_connections_past_the_cap_get_503_and_a_normal_client_is_served(
    xsmall_model_dir: Path, tmp_path: Path, flood_room: None
) -> None:
    log_path = tmp_path / "server.log"
    args = ["--model", str(xsmall_model_dir)]  # the default --header-timeout, 10 s
    with serve_process(args, log_path, open_files=SERVER_LIMIT) as (url, process):
        wait_ready(url, process, log_path)
        cap = int(re.findall(r"connections: at most (\d+) open", log_path.read_text())[0])
        connections = flood(url, FLOOD)
        refused_client = rerank(url)  # while the flood holds every slot
        answers = [read_until_closed(connection) for connection in connections]
        for connection in connections:
            connection.close()
        served = rerank(url)  # the idle ones are gone past --header-timeout
        alive = process.poll() is None
    log = log_path.read_text()
    refused = [answer for answer in answers if answer]
    held = FLOOD - len(refused)
    print(f"\ncap {cap}: {held} idle connections held, {len(refused)} got 503; server log {len(log)} bytes")
    assert cap < SERVER_LIMIT and held <= cap and len(refused) >= FLOOD - cap
    for answer in refused:
        status, headers, body = status_headers_body(answer)
        assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
        assert body == {
            "error": {"message": body["error"]["message"], "type": "overloaded", "param": None, "code": 503}
        }
    assert refused_client.status_code == 503 and refused_client.json()["error"]["type"] == "overloaded"
    assert served.status_code == 200 and len(served.json()["results"]) == 2
    assert alive and len(log) < 1_000_000
    assert "out of system resource" not in log and "Traceback" not in log
    assert log.count("refused a connection") <= 2  # once per 10 s, however many


def test_accept_errors_past_the_open_files_limit_are_logged_once_per_interval(
    xsmall_model_dir: Path, tmp_path: Path, flood_room: None
) -> None:
    """A cap set past what the limit allows: accept() fails for lack of descriptors, and asyncio reports each
    attempt (issue 38: ~10,000 tracebacks a second). The log gets a line per 10 s, and the server serves again
    once the idle connections time out."""
    log_path = tmp_path / "server.log"
    args = ["--model", str(xsmall_model_dir), "--header-timeout", "6", "--max-connections", "4096"]
    with serve_process(args, log_path, open_files=SERVER_LIMIT) as (url, process):
        wait_ready(url, process, log_path)
        connections = flood(url, FLOOD)
        answers = [read_until_closed(connection) for connection in connections]
        for connection in connections:
            connection.close()
        served = rerank(url)
        alive = process.poll() is None
    log = log_path.read_text()
    accept_errors = log.count("out of system resource")
    print(f"\naccept-error lines: {accept_errors}; server log {len(log)} bytes")
    assert all(answer == b"" for answer in answers)  # each held, then closed past --header-timeout
    assert 1 <= accept_errors <= 3 and "Traceback" not in log and len(log) < 1_000_000
    assert served.status_code == 200 and alive


# --- lifecycle --------------------------------------------------------------------------------------------


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for `signum` (its SigCgt mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(re.findall(r"^SigCgt:\s*([0-9a-f]+)$", status, re.MULTILINE)[0], 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.parametrize(
    ("after", "delay"),
    [("handler", 0.0), ("listening", 0.0), ("listening", 0.5), ("listening", 1.5)],
    ids=["while-importing", "as-loading-starts", "loading-0.5s", "loading-1.5s"],
)
def test_sigterm_while_the_model_loads_exits_0(
    xsmall_model_dir: Path, tmp_path: Path, after: str, delay: float
) -> None:
    """SIGTERM from the moment `rerankd serve` catches it: while the app's modules are imported, or `delay`
    seconds after the server listens, while the model loads in its thread (which the interpreter's
    finalization once aborted: "terminate called without an active exception", exit 134)."""
    log_path = tmp_path / "server.log"
    with serve_process(["--model", str(xsmall_model_dir)], log_path) as (_, process):
        if after == "handler":
            wait_until(lambda: catches(process.pid, signal.SIGTERM), poll_seconds=0.01)
        else:
            wait_until(lambda: "Uvicorn running" in log_path.read_text(), poll_seconds=0.01)
        time.sleep(delay)
        loaded_before = "ready after" in log_path.read_text()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    log = log_path.read_text()
    print(f"\nSIGTERM {delay}s after {after}: model loaded before it: {loaded_before}; exit {code}")
    assert code == 0
    assert "terminate called" not in log and "Traceback" not in log


def test_requests_still_running_when_the_grace_runs_out_get_503(
    xsmall_model_dir: Path, msmarco_dir: Path, tmp_path: Path
) -> None:
    """A thousand documents, one pair a pass: still running a second after SIGTERM, when the grace runs out
    (uvicorn's own cancellation, later, once answered a plain-text 500 and logged a CancelledError)."""
    log_path = tmp_path / "server.log"
    with (msmarco_dir / "corpus.jsonl").open() as corpus:
        documents = [json.loads(line)["text"] for line in itertools.islice(corpus, 1000)]
    args = ["--model", str(xsmall_model_dir), "--shutdown-timeout", "1", "--max-batch-pairs", "1"]
    with serve_process(args, log_path) as (url, process):
        wait_ready(url, process, log_path)
        result: dict[str, httpx.Response] = {}
        body = {"query": QUERY, "documents": documents}
        worker = threading.Thread(
            target=lambda: result.update(response=httpx.post(f"{url}/rerank", json=body, timeout=120))
        )
        worker.start()
        wait_until(lambda: metric(url, "rerankd_queued_pairs") > 0, poll_seconds=0.01)  # in flight
        process.send_signal(signal.SIGTERM)
        worker.join(timeout=120)
        code = process.wait(timeout=60)
    response = result["response"]
    log = log_path.read_text()
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "unavailable"
    assert code == 0
    assert "Traceback" not in log and "CancelledError" not in log
