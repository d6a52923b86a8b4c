"""Connecting a command to Ray: a cluster's address, or a Ray started on this machine for the command."""

from __future__ import annotations

import importlib.util
import os

# Ray's switch for a single-machine instance: its nodes then listen and meet on loopback, not on the
# machine's network address (Ray's default, which other nodes need, and a Ray of one machine does not).
SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ray_address(address: str | None) -> str | None:
    """The cluster a command joins: `address`, else `RAY_ADDRESS`; None starts a Ray on this machine."""
    return address or os.environ.get("RAY_ADDRESS") or None


def connect(address: str | None) -> None:
    """`ray.init` on the cluster at `address` (a head's `host:port`, `auto`, `ray://…`), or, without one, on
    a Ray started on this machine for this process, on loopback; it stops when the process disconnects.
    Call it before anything imports ray, which reads the switch once."""
    if address is None:
        os.environ.setdefault(SINGLE_MACHINE, "0")
    import ray

    if address is None:  # `local`: a new Ray, even where `ray start` left one (`ray.init()` would join it)
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=address)


def missing_ray() -> str | None:
    """Why the Ray commands cannot run here, or None when Ray is installed."""
    if importlib.util.find_spec("ray") is None:  # not imported: `connect` must come first
        return "Ray is not installed: pip install 'rerankd[ray]'"
    return None
