"""Run `rerankd serve` as a real process on a loopback port, and the other commands as processes, for
integration tests."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from rerankd.bench.processes import free_port, running_process

STARTUP_SECONDS = 120
FAULTS_SCRIPT = Path(__file__).with_name("faults.py")


@contextlib.contextmanager
def running_server(
    args: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    ready_path: str = "/ready",
    fault_marker: str | None = None,
) -> Iterator[str]:
    """Start the server, wait (bounded) until `ready_path` answers 200 (by default: every model loaded and
    warmed up), yield its base URL, then stop it. The Hub is off (HF_HUB_OFFLINE=1) unless `env` says
    otherwise. With `fault_marker`, every forward pass holding that word fails (tests/faults.py)."""
    port = free_port()
    entry = ["-m", "rerankd"] if fault_marker is None else [str(FAULTS_SCRIPT), fault_marker]
    command = [sys.executable, *entry, "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    base_url = f"http://127.0.0.1:{port}"
    env = {"HF_HUB_OFFLINE": "1", **(env or {})}
    with running_process(
        command, base_url, log_path, env=env, ready_path=ready_path, startup_seconds=STARTUP_SECONDS
    ):
        yield base_url


def run_cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`rerankd ARGS` as a user runs it, output captured (bounded: five minutes)."""
    return subprocess.run(
        [sys.executable, "-m", "rerankd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def rank_order(model: Path, query: str, documents: list[str], *flags: str) -> list[int]:
    """The documents' indices as `rerankd rank --json` ranks them, best first, in float32."""
    result = run_cli(
        "rank", "--model", str(model), "--dtype", "float32", *flags, "--json", "--query", query, *documents
    )
    assert result.returncode == 0, result.stderr
    return [item["index"] for item in json.loads(result.stdout)["results"]]


def wait_until(condition: Callable[[], bool], seconds: float = 60, poll_seconds: float = 0.2) -> None:
    """Poll `condition` until it holds; fail after `seconds` (a bound on waiting, not on the server's
    speed: what is awaited happens within a second or two)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(poll_seconds)


def metric(base_url: str, name: str, headers: dict[str, str] | None = None) -> float:
    """The value of a metric line (sum over its label sets) in the /metrics text."""
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=30).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)
