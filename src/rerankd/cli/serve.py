"""`rerankd serve`: the HTTP server, its models loaded in the background once it listens.

A stop signal (SIGTERM, SIGINT) at any moment from `run`'s start ends it cleanly: exit 0, or 1 if no model
could be loaded, 3 if the address could not be bound (uvicorn's), 2 for invalid settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from rerankd.cli.flags import InvalidSettings, add_config_flag, add_settings_flags, serve_settings
from rerankd.settings import RuntimeSettings, ServeSettings

if TYPE_CHECKING:
    from rerankd.api.connections import GracefulServer
    from rerankd.backends.base import RerankBackend
    from rerankd.engine.engine import RerankEngine
    from rerankd.engine.models import ServedModels

BackendWrapper = Callable[["RerankBackend"], "RerankBackend"]


def add_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        description="Every setting also comes from RERANKD_<NAME> environment variables or a TOML file "
        "(--config); a flag wins over the environment, which wins over the file.",
    )
    add_config_flag(serve)
    add_settings_flags(serve.add_argument_group("model"), RuntimeSettings)
    add_settings_flags(serve.add_argument_group("server"), ServeSettings)
    serve.set_defaults(run=run)


def run(args: argparse.Namespace, wrap_backend: BackendWrapper | None = None) -> int:
    """Serve until SIGTERM or SIGINT. `wrap_backend`, when given, wraps every loaded backend (tests inject
    faults through it)."""
    early_signals = _remember_stop_signals()  # first: the imports below take seconds
    import uvicorn

    from rerankd.api.app import create_app
    from rerankd.api.connections import GracefulServer, GuardedH11Protocol, connection_limits
    from rerankd.engine.loader import load_engine
    from rerankd.engine.models import ServedModels
    from rerankd.logs import configure_logging
    from rerankd.metrics import ServerMetrics

    try:
        settings = serve_settings(args)
    except InvalidSettings as error:
        print(f"rerankd serve: invalid settings: {error}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, settings.log_format)
    metrics = ServerMetrics()

    def load(name: str, reference: str) -> RerankEngine:
        return load_engine(
            reference,
            settings,
            served_name=name,
            on_batch=metrics.batch_observer(name),
            wrap_backend=wrap_backend,
        )

    models = ServedModels.pending(settings.served_models())
    no_model = {"failed": False}

    def stop_without_models() -> None:
        logging.getLogger("rerankd").error("no model could be loaded; stopping")
        no_model["failed"] = True
        server.should_exit = True

    app = create_app(models, settings, loader=load, metrics=metrics, on_no_model=stop_without_models)
    limits = connection_limits(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        access_log=False,  # rerankd logs one structured line per request itself
        log_config=None,
        http=GuardedH11Protocol.with_limits(limits),
        # asyncio's loop, even where uvloop is installed (Ray Serve brings it): the connection guard logs
        # failed accept() calls through asyncio's handler, which uvloop bypasses.
        loop="asyncio",
        timeout_keep_alive=settings.keep_alive_timeout,  # type: ignore[arg-type]  # uvicorn takes a float
        backlog=limits.listen_backlog,
    )
    server = GracefulServer(config, app.state.rerankd.shutdown, settings.shutdown_timeout, early_signals)
    code = _serve(server)
    return _leave(1 if code == 0 and no_model["failed"] else code, models)


def _remember_stop_signals() -> list[int]:
    """Catch SIGTERM and SIGINT from now on: before uvicorn takes them over they stop the server before it
    starts, and after, when uvicorn hands them back and raises them again, they are done with."""
    received: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, remember)
    return received


def _serve(server: GracefulServer) -> int:
    try:
        server.run()
    except SystemExit as failure:  # uvicorn's own, when it cannot start (the address is taken)
        return failure.code if isinstance(failure.code, int) else 1
    return 0


def _leave(code: int, models: ServedModels) -> int:
    """`code`, to return; but while a model still loads, the process ends here: the loader thread may be in
    torch's C++ code, which the interpreter's finalization aborts ("terminate called without an active
    exception", exit 134)."""
    if all(slot.state != "loading" for slot in models.slots()):
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
