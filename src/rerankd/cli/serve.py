"""`rerankd serve`: the HTTP server, its models loaded in the background once it listens."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rerankd.cli.flags import add_settings_flags, given_flags
from rerankd.settings import RuntimeSettings, ServeSettings, load_settings

if TYPE_CHECKING:
    from rerankd.backends.base import RerankBackend
    from rerankd.engine.engine import RerankEngine

BackendWrapper = Callable[["RerankBackend"], "RerankBackend"]


def add_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        description="Every setting also comes from RERANKD_<NAME> environment variables or a TOML file "
        "(--config); a flag wins over the environment, which wins over the file.",
    )
    serve.add_argument(
        "--config", type=Path, default=None, help="a TOML file of settings (env RERANKD_CONFIG)"
    )
    add_settings_flags(serve.add_argument_group("model"), RuntimeSettings)
    add_settings_flags(serve.add_argument_group("server"), ServeSettings)
    serve.set_defaults(run=run)


def run(args: argparse.Namespace, wrap_backend: BackendWrapper | None = None) -> int:
    """Serve until SIGTERM or SIGINT. `wrap_backend`, when given, wraps every loaded backend (tests inject
    faults through it)."""
    import uvicorn
    from pydantic import ValidationError

    from rerankd.api.app import create_app
    from rerankd.engine.loader import load_engine
    from rerankd.engine.models import ServedModels
    from rerankd.logs import configure_logging
    from rerankd.metrics import ServerMetrics

    try:
        settings = load_settings(ServeSettings, given_flags(args, ServeSettings), args.config)
    except (ValidationError, ValueError) as error:
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

    config = uvicorn.Config(
        app="",  # set below, once the server exists for the loader to stop it
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        access_log=False,  # rerankd logs one structured line per request itself
        log_config=None,
        timeout_graceful_shutdown=settings.shutdown_timeout,  # type: ignore[arg-type]  # uvicorn takes float
    )
    server = uvicorn.Server(config)
    no_model = {"failed": False}

    def stop_without_models() -> None:
        logging.getLogger("rerankd").error("no model could be loaded; stopping")
        no_model["failed"] = True
        server.should_exit = True

    config.app = create_app(
        ServedModels.pending(settings.served_models()),
        settings,
        loader=load,
        metrics=metrics,
        on_no_model=stop_without_models,
    )
    # uvicorn finishes in-flight requests on SIGTERM (within --shutdown-timeout), then re-raises the signal
    # to the handler it found: this one, so that a graceful stop exits 0.
    signal.signal(signal.SIGTERM, _exit_gracefully)
    server.run()
    return 1 if no_model["failed"] else 0


def _exit_gracefully(signum: int, frame: object) -> None:
    raise SystemExit(0)
