"""How a normal request fares while hostile traffic runs: `python -m rerankd.bench.hostile --model DIR`.

Starts `rerankd serve` on loopback, times a normal 2-document request alone, then again while each attack of
issue 38 runs from this process (idle connections, trickled bodies, bodies that are costly to tokenize, huge
requests, many large bodies at once), and prints the p95 of each as a multiple of the p95 alone. Everything
is bounded: each attack runs while the normal requests are timed, and stops with them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from rerankd.bench.machine import describe_machine
from rerankd.bench.processes import free_port, running_process

QUERY = "Who wrote To Kill a Mockingbird?"
NORMAL = {
    "query": QUERY,
    "documents": ["A novel by Harper Lee.", "Moby-Dick was written by Herman Melville."],
}
Attack = Callable[[str, threading.Event], None]


def _p95(url: str, count: int) -> float:
    """Of `count` requests in a row, after 5 untimed ones (the first after an attack meet its leftovers)."""
    with httpx.Client(timeout=120) as client:
        seconds = []
        for _ in range(5):
            assert client.post(f"{url}/rerank", json=NORMAL).status_code == 200
        for _ in range(count):
            started = time.perf_counter()
            assert client.post(f"{url}/rerank", json=NORMAL).status_code == 200
            seconds.append(time.perf_counter() - started)
    return statistics.quantiles(seconds, n=20)[-1]


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def idle_connections(url: str, stop: threading.Event) -> None:
    """500 connections that send nothing, reopened as the server closes them."""
    sockets: list[socket.socket] = []
    while not stop.is_set():
        sockets = [held for held in sockets if _still_open(held)]
        while len(sockets) < 500 and not stop.is_set():
            with contextlib.suppress(OSError):
                sockets.append(socket.create_connection(_address(url), timeout=1))
        stop.wait(0.5)
    for held in sockets:
        held.close()


def _still_open(held: socket.socket) -> bool:
    held.setblocking(False)
    try:
        return held.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        held.setblocking(True)


def trickled_bodies(url: str, stop: threading.Event) -> None:
    """50 uploads sending a byte every half second."""
    head = (
        "POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    connections = []
    for _ in range(50):
        with contextlib.suppress(OSError):
            connection = socket.create_connection(_address(url), timeout=1)
            connection.sendall(head.encode())
            connections.append(connection)
    while not stop.wait(0.5):
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.sendall(b" ")
    for connection in connections:
        connection.close()


def _posting(body: bytes, clients: int) -> Attack:
    def attack(url: str, stop: threading.Event) -> None:
        def client() -> None:
            with httpx.Client(timeout=300) as session:
                while not stop.is_set():
                    headers = {"Content-Type": "application/json"}
                    with contextlib.suppress(httpx.TransportError):
                        session.post(f"{url}/rerank", content=body, headers=headers)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return attack


ATTACKS: dict[str, Attack] = {
    "500 idle connections": idle_connections,
    "50 trickled bodies": trickled_bodies,
    "2 clients: 53 x 100k U+FDFA (16 MB)": _posting(
        json.dumps({"query": QUERY, "documents": ["\ufdfa" * 100_000] * 53}, ensure_ascii=False).encode(), 2
    ),
    "2 clients: 1,000 documents each": _posting(
        json.dumps(
            {"query": QUERY, "documents": [f"passage {n} about a novel" for n in range(1000)]}
        ).encode(),
        2,
    ),
    "10 clients: 15 MB bodies": _posting(
        json.dumps({"query": QUERY, "documents": ["word " * 20_000] * 150}).encode(), 10
    ),
}


@contextlib.contextmanager
def _running(attack: Attack, url: str) -> Iterator[None]:
    stop = threading.Event()
    thread = threading.Thread(target=attack, args=(url, stop), daemon=True)
    thread.start()
    try:
        time.sleep(2)  # let the attack build up
        yield
    finally:
        stop.set()
        thread.join(timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model folder (e.g. a random xsmall)")
    parser.add_argument("--requests", type=int, default=60, help="normal requests timed per measurement")
    parser.add_argument("--log", type=Path, default=Path("hostile-server.log"))
    parser.add_argument("--only", default="", help="run only the attacks whose name contains this")
    parser.add_argument("serve_args", nargs="*", help="more `rerankd serve` flags (after --)")
    args = parser.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "rerankd", "serve", "--model", str(args.model), "--port", str(port)]
    command += args.serve_args
    with running_process(command, url, args.log, ready_path="/ready"):
        alone = _p95(url, args.requests)
        machine = describe_machine()
        features = ", ".join(str(flag) for flag in machine["cpu_features"])  # type: ignore[attr-defined]
        print(f"{machine['cpu']} ({features}), {machine['cores']} cores; {args.model}\n")
        print("| attack | normal request p95 (ms) | × alone |\n|---|---|---|")
        print(f"| none | {alone * 1000:.0f} | 1.00 |")
        for name, attack in ATTACKS.items():
            if args.only not in name:
                continue
            with _running(attack, url):
                during = _p95(url, args.requests)
            print(f"| {name} | {during * 1000:.0f} | {during / alone:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
