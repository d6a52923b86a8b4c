"""Command-line flags: generated from the settings' fields, and the argument types the commands share."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from rerankd.settings import ENV_PREFIX, RuntimeSettings, ServeSettings, load_settings


def _flag_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse keyword arguments for a field's annotation."""
    if typing.get_origin(annotation) is Annotated:
        return _flag_type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _flag_type(inner)
    if typing.get_origin(annotation) is Literal:
        return str, {"choices": list(typing.get_args(annotation))}
    if typing.get_origin(annotation) is list:
        return str, {"action": "append"}
    if annotation is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    return annotation, {}


def _default_text(field: FieldInfo) -> str:
    default = field.default
    if isinstance(default, list):
        return ", ".join(map(str, default)) or "none"
    return "none" if default is None else str(default)


def add_settings_flags(
    parser: argparse._ActionsContainer,
    cls: type[BaseSettings],
    skip: Sequence[str] = (),
    only: Collection[str] | None = None,
) -> None:
    """One flag per field of `cls` (those named in `only`, else those declared on it, not inherited from a
    parent it extends), defaulting to None so that only the flags a user gives override the environment and
    the config file."""
    inherited = set().union(*(getattr(base, "model_fields", {}) for base in cls.__mro__[1:]))
    for name, field in cls.model_fields.items():
        chosen = name in only if only is not None else name not in inherited
        if name in skip or not chosen:
            continue
        kind, extra = _flag_type(field.annotation)
        if kind is not None:
            extra["type"] = kind
        description = field.description or ""
        if "(default:" not in description:
            description += f" (default: {_default_text(field)})"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            help=f"{description}; env {ENV_PREFIX}{name.upper()}".replace("%", "%%"),
            **extra,
        )


def given_flags(args: argparse.Namespace, cls: type[BaseSettings]) -> dict[str, Any]:
    """The flags of `cls` the user gave."""
    return {
        name: value for name, value in vars(args).items() if name in cls.model_fields and value is not None
    }


def runtime_settings(args: argparse.Namespace) -> RuntimeSettings:
    """The runtime settings of a command that loads models in process: its flags, the environment."""
    return load_settings(RuntimeSettings, given_flags(args, RuntimeSettings))


class InvalidSettings(Exception):
    """One line naming each invalid setting and what is wrong with it."""


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, help="a TOML file of settings (env RERANKD_CONFIG)"
    )


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """`rerankd serve`'s settings: the flags given, then the environment, then the `--config` file. Commands
    that act for the server (`download`) read them here too, so that they agree with it on every value."""
    try:
        return load_settings(ServeSettings, given_flags(args, ServeSettings), args.config)
    except ValidationError as error:
        # Each setting's location and message, never its value: it may be an API key from the environment.
        problems = [
            f"{'.'.join(map(str, problem['loc']))}: {problem['msg'].removeprefix('Value error, ')}"
            for problem in error.errors(include_url=False, include_context=False, include_input=False)
        ]
        raise InvalidSettings("; ".join(problems)) from error
    except ValueError as error:
        raise InvalidSettings(str(error)) from error


def _at_least(minimum: int, value: str) -> int:
    number = int(value)
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
    return number


def positive(value: str) -> int:
    return _at_least(1, value)
