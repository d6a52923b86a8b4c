"""`rerankd serve`'s app as a Ray Serve deployment: every route and dialect is the same FastAPI app
(`api.app.create_app`), built in each replica around that replica's own engines, so Serve only adds the
proxy in front and the replicas behind it.

`serve run rerankd.distributed.replica:app_builder model=DIR num_replicas=2` deploys it without the
`rerankd ray-serve` command (Serve's application builder: each argument is a serve setting or a
`ReplicaScaling` field, the rest come from `RERANKD_*` variables as for `rerankd serve`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from pydantic import TypeAdapter
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rerankd.api.app import create_app
from rerankd.distributed.scaling import ReplicaScaling
from rerankd.engine.engine import RerankEngine
from rerankd.engine.loader import load_engine
from rerankd.engine.models import ServedModels
from rerankd.metrics import ServerMetrics
from rerankd.settings import ServeSettings, load_settings

logger = logging.getLogger(__name__)

APP_NAME = "rerankd"
# Which replica answered: Serve's id of it (the end of its actor's name), for tracing a response to a replica.
REPLICA_HEADER = "X-Rerankd-Replica"
REQUEST_ID = b"x-request-id"


class ReplicaHeader:
    """Adds `X-Rerankd-Replica` to every HTTP response of the app it wraps, and leaves `X-Request-ID` to
    Serve's proxy, which adds it to every response (the same id: the app takes the one the proxy sends)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [item for item in message.get("headers", []) if item[0].lower() != REQUEST_ID]
                message = {**message, "headers": [*headers, self.header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


@serve.ingress()
class RerankReplica:
    """One replica: its models are loaded (and warmed up) before Serve routes a request to it, and a
    replica whose model fails to load fails to start, so that Serve retries it rather than serving part of
    the models. Serve runs the app's lifespan, which closes the engines when the replica stops."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = ServeSettings.model_validate(dict(settings))
        self.metrics = ServerMetrics()
        self.models = ServedModels.pending(self.settings.served_models())
        self.models.load_all(self._load, warmup=self.settings.warmup)
        failed = {slot.name: slot.error for slot in self.models.slots() if slot.engine is None}
        if failed:
            self.models.close()
            raise RuntimeError(f"replica could not load its models: {failed}")
        self.replica = serve.get_replica_context().replica_id.unique_id
        logger.info("replica %s (pid %d) serves %s", self.replica, os.getpid(), self.models.names())

    def _load(self, name: str, reference: str) -> RerankEngine:
        return load_engine(
            reference, self.settings, served_name=name, on_batch=self.metrics.batch_observer(name)
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.models, self.settings, metrics=self.metrics)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app

    def check_health(self) -> None:
        """Serve's health check: a backend that reports a problem (a lost GPU) gets the replica replaced."""
        readiness = self.models.readiness()
        if readiness.unhealthy or not readiness.serving:
            raise RuntimeError(f"replica {self.replica} is {readiness.status}: {readiness.failed}")


def rerank_application(settings: ServeSettings, scaling: ReplicaScaling) -> Any:
    """The Serve application (`Deployment.bind()`) serving `settings`' models with `scaling`. The settings
    are resolved here, once, and every replica gets the same values."""
    replica_settings = scaling.replica_settings(settings)
    deployment = serve.deployment(RerankReplica).options(
        name=APP_NAME, **scaling.deployment_options(settings.shutdown_timeout)
    )
    # Plain values, not the settings object: `load_settings` gives a class of its own, made at run time.
    return deployment.bind(replica_settings.model_dump(mode="json"))


def app_builder(args: dict[str, str]) -> Any:
    """Serve's application builder (`serve run rerankd.distributed.replica:app_builder KEY=VALUE ...`):
    `ReplicaScaling` fields from `args`, the rest of `args` as serve settings (`model=DIR`), then the
    environment and `RERANKD_CONFIG`, as `rerankd serve` reads them."""
    fields = {field.name for field in dataclasses.fields(ReplicaScaling)}
    scaling = TypeAdapter(ReplicaScaling).validate_python(
        {name: value for name, value in args.items() if name in fields}
    )
    settings_args = {name: value for name, value in args.items() if name not in fields}
    settings = load_settings(ServeSettings, settings_args)
    return rerank_application(settings, scaling)
