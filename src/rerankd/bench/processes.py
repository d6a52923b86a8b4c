"""Servers and workers as child processes: started, waited for (bounded), measured, stopped."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from rerankd.bench.timing import peak_rss_bytes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServerProcess:
    base_url: str
    process: subprocess.Popen[bytes]

    def peak_rss(self) -> int | None:
        return peak_rss_bytes(self.process.pid)


@contextlib.contextmanager
def running_process(
    command: Sequence[str],
    base_url: str,
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    ready_path: str = "/health",
    startup_seconds: float = 120,
) -> Iterator[ServerProcess]:
    """Start `command`, wait until GET `ready_path` answers 200, yield it, then terminate (or kill) it."""
    with log_path.open("w") as log:
        process = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        try:
            deadline = time.monotonic() + startup_seconds
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{command[0]} exited with {process.returncode}:\n{log_path.read_text()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base_url}{ready_path}", timeout=1.0).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{command[0]} not up after {startup_seconds:.0f}s:\n{log_path.read_text()}"
                    )
                time.sleep(0.2)
            yield ServerProcess(base_url, process)
        finally:
            stop_process(process)


def stop_process(process: subprocess.Popen[bytes], seconds: float = 20) -> None:
    """Terminate `process`, and kill it if it has not exited within `seconds`."""
    process.terminate()
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
