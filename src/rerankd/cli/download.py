"""`rerankd download`: fetch into the model cache the files `rerankd serve` would load, and stop.

A server started afterwards with `HF_HUB_OFFLINE=1` (a Kubernetes pod after its init container, an
air-gapped host after a connected one filled the cache) finds every file there. The models, revision, cache
and backend come from serve's own flags, `RERANKD_*` variables and config file, and the files from the
function serving loads them with, so the two never disagree. Exit 0 when every model is in the cache; 1 when
one could not be fetched (one line each, naming it); 2 for invalid settings.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from rerankd.cli.flags import InvalidSettings, add_config_flag, add_settings_flags, serve_settings
from rerankd.settings import ServeSettings

# The settings that decide which files a model needs; the rest of serve's are read (and checked) but not
# offered as flags, since they change nothing here.
FETCH_SETTINGS = ("model", "revision", "model_cache", "backend")

logger = logging.getLogger(__name__)


def add_parser(commands: Any) -> None:
    download = commands.add_parser(
        "download",
        help="fetch the models `rerankd serve` would serve into the model cache, then exit",
        description="Takes the models, revision, cache and backend from the flags below, RERANKD_<NAME> "
        "environment variables or a TOML file (--config), exactly as `rerankd serve` does.",
    )
    add_config_flag(download)
    add_settings_flags(download.add_argument_group("model"), ServeSettings, only=FETCH_SETTINGS)
    download.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rerankd.engine.loader import fetch_model_files
    from rerankd.hub import ModelSourceError
    from rerankd.logs import configure_logging

    try:
        settings = serve_settings(args)
    except InvalidSettings as error:
        print(f"rerankd download: invalid settings: {error}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, settings.log_format)
    failed = False
    for model in dict.fromkeys(reference for _, reference in settings.served_models()):
        try:
            source = fetch_model_files(model, settings)
        except ModelSourceError as error:
            # Every model is tried, so that one failure does not hide another; huggingface_hub's messages may
            # span lines, a log reader wants one.
            print(f"rerankd download: {' '.join(str(error).split())}", file=sys.stderr)
            failed = True
            continue
        if source.commit is None:
            logger.info("model %s is the local path %s: nothing to fetch", model, source.path)
        else:
            logger.info("model %s is in the cache at commit %s: %s", model, source.commit, source.path)
    return 1 if failed else 0
