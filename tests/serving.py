"""Run `rerankd serve` as a real process on a loopback port, for integration tests."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from rerankd.bench.processes import free_port, running_process

STARTUP_SECONDS = 120


@contextlib.contextmanager
def running_server(
    args: list[str], log_path: Path, env: dict[str, str] | None = None, ready_path: str = "/ready"
) -> Iterator[str]:
    """Start the server, wait (bounded) until `ready_path` answers 200 (by default: every model loaded and
    warmed up), yield its base URL, then stop it. The Hub is off (HF_HUB_OFFLINE=1) unless `env` says
    otherwise."""
    port = free_port()
    command = [sys.executable, "-m", "rerankd", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    base_url = f"http://127.0.0.1:{port}"
    env = {"HF_HUB_OFFLINE": "1", **(env or {})}
    with running_process(
        command, base_url, log_path, env=env, ready_path=ready_path, startup_seconds=STARTUP_SECONDS
    ):
        yield base_url
