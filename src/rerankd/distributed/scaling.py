"""What Ray reserves for rerankd's engines and how many run: Serve's replicas (`ReplicaScaling`) and Ray
Data's scoring actors (`WorkerResources`). Plain values, checked before Ray is started."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rerankd.settings import ServeSettings


@dataclass(frozen=True)
class ReplicaScaling:
    """How many replicas, what each one reserves, and how many requests each takes at once. With
    `max_replicas`, Serve autoscales between `min_replicas` and it on ongoing requests per replica."""

    num_replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    # Concurrent requests a replica takes (its engine batches their pairs together). Serve's proxy fills the
    # replicas on its own node up to this many before it sends any elsewhere: kept low, the load spreads.
    max_ongoing_requests: int = 4
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0

    def __post_init__(self) -> None:
        if self.num_replicas < 1 or self.max_ongoing_requests < 1:
            raise ValueError("num_replicas and max_ongoing_requests must be at least 1")
        if self.cpus_per_replica < 0 or self.gpus_per_replica < 0 or self.target_ongoing_requests <= 0:
            raise ValueError("cpus and gpus per replica must be >= 0, target_ongoing_requests > 0")
        if self.min_replicas is not None and self.max_replicas is None:
            raise ValueError("min_replicas needs max_replicas (autoscaling)")
        if self.max_replicas is not None and not 0 <= self.fewest <= self.max_replicas >= 1:
            raise ValueError("autoscaling needs 0 <= min_replicas <= max_replicas and max_replicas >= 1")

    @property
    def fewest(self) -> int:
        """Autoscaling's lower bound."""
        return 1 if self.min_replicas is None else self.min_replicas

    def deployment_options(self, shutdown_timeout: float) -> dict[str, Any]:
        """Serve's options for the deployment; in-flight requests get `shutdown_timeout` to finish when a
        replica is stopped, as `rerankd serve`'s drain does."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": self.max_ongoing_requests,
            "graceful_shutdown_timeout_s": shutdown_timeout,
        }
        if self.max_replicas is None:
            options["num_replicas"] = self.num_replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.fewest,
                "max_replicas": self.max_replicas,
                "initial_replicas": min(max(self.num_replicas, self.fewest), self.max_replicas),
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        return options

    def replica_settings(self, settings: ServeSettings) -> ServeSettings:
        """`settings` for a replica: unless they set `threads`, a replica's forward pass uses the CPUs it
        reserved, not every core of its node (which the node's other replicas share)."""
        if settings.threads is not None or self.cpus_per_replica < 1:
            return settings
        return settings.model_copy(update={"threads": int(self.cpus_per_replica)})


@dataclass(frozen=True)
class WorkerResources:
    """Ray Data actors scoring at once, and what each reserves (a GPU: its engine runs on it)."""

    workers: int | None = None  # None: as many as the cluster's CPUs (or GPUs) hold
    cpus: float = 1.0
    gpus: float = 0.0

    def count(self, cluster: dict[str, float], shards: int) -> int:
        """Workers for `shards` on a cluster of these total resources (`ray.cluster_resources()`); raises
        `ValueError` when not one fits, rather than waiting for resources that will not come."""
        cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
        fits = min(cpus // self.cpus if self.cpus else shards, gpus // self.gpus if self.gpus else shards)
        if fits < 1:
            raise ValueError(
                f"the cluster has {cpus:g} CPUs and {gpus:g} GPUs: not one worker of {self.cpus:g} CPUs and "
                f"{self.gpus:g} GPUs fits (--cpus-per-worker, --gpus-per-worker)"
            )
        return max(1, min(int(fits) if self.workers is None else self.workers, shards))
