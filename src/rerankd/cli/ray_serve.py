"""`rerankd ray-serve`: `rerankd serve`'s app on a Ray cluster, as a Ray Serve deployment of replicas with
an engine each, behind Serve's HTTP proxy on --host and --port. It runs until SIGTERM or SIGINT, then
deletes the deployment (and stops the Ray it started, if it started one).

Exit codes: 0 after a stop signal, 1 if the deployment failed (a replica could not load its models), 2 for
invalid settings or no Ray installed.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
from types import FrameType
from typing import Any

from rerankd.cli.flags import InvalidSettings, add_config_flag, add_settings_flags, positive, serve_settings
from rerankd.settings import RuntimeSettings, ServeSettings

logger = logging.getLogger("rerankd.ray_serve")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "ray-serve",
        help="run the HTTP server on a Ray cluster, as a Ray Serve deployment of replicas",
        description="The settings are `rerankd serve`'s (flags, RERANKD_* variables, --config), read once "
        "here and given to every replica; --host and --port are Serve's HTTP proxy's. Without --address (or "
        "RAY_ADDRESS) it starts a Ray on this machine.",
    )
    add_config_flag(parser)
    add_settings_flags(parser.add_argument_group("model"), RuntimeSettings)
    add_settings_flags(parser.add_argument_group("server"), ServeSettings)
    ray = parser.add_argument_group("ray")
    ray.add_argument(
        "--address", default=None, help="the Ray cluster (host:port of its head, auto, ray://...)"
    )
    ray.add_argument("--num-replicas", type=positive, default=1, help="replicas (default: %(default)s)")
    ray.add_argument(
        "--max-replicas", type=positive, default=None, help="autoscale up to this many (Serve's policy)"
    )
    ray.add_argument(
        "--min-replicas", type=int, default=None, help="autoscale down to this many (default: 1)"
    )
    ray.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=2.0,
        help="autoscaling's aim: requests per replica, in flight or waiting for one (default: %(default)s)",
    )
    ray.add_argument(
        "--max-ongoing-requests",
        type=positive,
        default=4,
        help="requests a replica takes at once, batched together; the rest wait at the proxy, which fills "
        "the replicas on its own node first, up to this many each (default: %(default)s)",
    )
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="(default: %(default)s)")
    ray.add_argument("--gpus-per-replica", type=float, default=0.0, help="(default: %(default)s)")
    ray.add_argument(
        "--proxy-location",
        choices=["EveryNode", "HeadOnly"],
        default="EveryNode",
        help="Serve's HTTP proxies: one on every node, or on the head only (default: %(default)s)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rerankd.distributed.cluster import connect, missing_ray, ray_address
    from rerankd.distributed.scaling import ReplicaScaling

    def fail(message: str) -> int:
        print(f"rerankd ray-serve: {message}", file=sys.stderr)
        return 2

    try:
        settings = serve_settings(args)
        scaling = ReplicaScaling(
            num_replicas=args.num_replicas,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            target_ongoing_requests=args.target_ongoing_requests,
            max_ongoing_requests=args.max_ongoing_requests,
            cpus_per_replica=args.cpus_per_replica,
            gpus_per_replica=args.gpus_per_replica,
        )
    except (InvalidSettings, ValueError) as error:
        return fail(f"invalid settings: {error}")
    if problem := missing_ray():
        return fail(problem)
    connect(ray_address(args.address))
    import ray
    from ray import serve

    from rerankd.distributed.replica import APP_NAME, rerank_application

    stop = _stop_event()  # after ray.init, which sets its own SIGTERM handler
    serve.start(
        proxy_location=args.proxy_location,
        http_options={
            "host": settings.host,
            "port": settings.port,
            "keep_alive_timeout_s": math.ceil(settings.keep_alive_timeout),
        },
    )
    try:
        serve.run(rerank_application(settings, scaling), name=APP_NAME, route_prefix="/")
    except RuntimeError as error:  # Serve's: the deployment failed, each replica's reason in the log
        print(f"rerankd ray-serve: the deployment failed: {error}", file=sys.stderr)
        ray.shutdown()
        return 1
    logger.info("serving on http://%s:%d; SIGTERM or SIGINT stops", settings.host, settings.port)
    stop.wait()
    serve.delete(APP_NAME)
    ray.shutdown()
    return 0


def _stop_event() -> threading.Event:
    """Set by SIGTERM or SIGINT from now on."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, on_signal)
    return stop
