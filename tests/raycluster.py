"""A real Ray cluster on loopback for the tests: a head node and a worker node, each `ray start --block` in a
session of its own, so that stopping it ends exactly the processes it started (and the workers their
raylets spawned), whatever other Ray runs on the machine.

Ray turns 127.0.0.1 into the machine's network address (so that other machines could reach the node); other
loopback addresses it keeps as given, so the head listens and advertises on 127.0.0.2 and the worker node on
127.0.0.3: every byte between the nodes, the drivers and Serve's proxy stays on loopback.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rerankd.bench.processes import free_port

HEAD_IP = "127.0.0.2"
WORKER_IP = "127.0.0.3"
START_SECONDS = 90
RAY = Path(sys.executable).with_name("ray")


@dataclass(frozen=True)
class RayCluster:
    address: str  # the head's GCS, host:port
    env: dict[str, str]  # for commands that join it: RAY_ADDRESS and the settings below


def ray_env() -> dict[str, str]:
    """No usage reporting, nothing else that would reach beyond the machine, and no token authentication:
    set either way, so that the nodes and every client agree whether or not this machine keeps a token in
    ~/.ray (which a `ray.init()` of a new local Ray writes, and a later `ray start` would then require)."""
    return {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
        "RAY_AUTH_MODE": "disabled",
    }


@contextlib.contextmanager
def ray_cluster(log_dir: Path, cpus_per_node: int = 1) -> Iterator[RayCluster]:
    """Start the head and one worker node (`cpus_per_node` CPUs each), wait (bounded) until both are alive,
    yield the cluster, then stop both sessions."""
    port = free_port()
    address = f"{HEAD_IP}:{port}"
    env = ray_env()
    common = ["--block", "--num-cpus", str(cpus_per_node), "--num-gpus", "0", "--disable-usage-stats"]
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        head = [str(RAY), "start", "--head", "--port", str(port), "--node-ip-address", HEAD_IP, *common]
        head += ["--include-dashboard", "false", "--ray-client-server-port", str(free_port())]
        nodes.append(_start(head, log_dir / "ray-head.log", env))
        _wait_for_nodes(address, 1, env, nodes)
        worker = [str(RAY), "start", "--address", address, "--node-ip-address", WORKER_IP, *common]
        nodes.append(_start(worker, log_dir / "ray-worker.log", env))
        _wait_for_nodes(address, 2, env, nodes)
        yield RayCluster(address, {**env, "RAY_ADDRESS": address})
    finally:
        for node in reversed(nodes):
            _stop_session(node)
        _forget(address)


def _forget(address: str) -> None:
    """Remove the note `ray start` leaves of the cluster it started, which a later `ray.init()` on this
    machine would try to join, once the cluster is gone."""
    note = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if note.read_text().strip() == address:
            note.unlink()


def _start(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _wait_for_nodes(
    address: str, count: int, env: dict[str, str], nodes: list[subprocess.Popen[bytes]]
) -> None:
    """Until `ray status` counts `count` healthy nodes (bounded by START_SECONDS)."""
    deadline = time.monotonic() + START_SECONDS
    while True:
        for node in nodes:
            assert node.poll() is None, f"a Ray node exited with {node.returncode}: {node.args}"
        status = subprocess.run(
            [str(RAY), "status", "--address", address], capture_output=True, text=True, env=env, timeout=60
        )
        healthy = re.search(r"Active:\n((?: +\d+ node_\w+\n)+)", status.stdout)
        if healthy and len(healthy.group(1).strip().splitlines()) >= count:
            return
        assert time.monotonic() < deadline, (
            f"Ray nodes not up in {START_SECONDS}s:\n{status.stdout}{status.stderr}"
        )
        time.sleep(1)


def _stop_session(node: subprocess.Popen[bytes], seconds: float = 5) -> None:
    """SIGTERM every process of the node's session (`ray start --block` and what it started: GCS, raylet,
    agents, the workers the raylet spawned), then SIGKILL those still there after `seconds`."""
    session = node.pid  # the leader of the session it was started in
    for stop_signal in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_members(session):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, stop_signal)
        deadline = time.monotonic() + seconds
        while _session_members(session) and time.monotonic() < deadline:
            node.poll()  # reaps the leader; the others are reparented and reaped by init
            time.sleep(0.2)
    node.wait(timeout=seconds)


def _session_members(session: int) -> list[int]:
    """The live processes of a session (a zombie has already exited: it only waits to be reaped)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            state, _, _, sid = stat.rsplit(")", 1)[1].split()[:4]
            if int(sid) == session and state != "Z":
                members.append(int(entry))
    return members
