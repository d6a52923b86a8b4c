"""Command-line flags: generated from the settings' fields, and the argument types the commands share."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from rerankd.settings import ENV_PREFIX, RuntimeSettings, load_settings


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
    parser: argparse._ActionsContainer, cls: type[BaseSettings], skip: Sequence[str] = ()
) -> None:
    """One flag per field of `cls` (declared on it, not inherited from a parent it extends), defaulting to
    None so that only the flags a user gives override the environment and the config file."""
    inherited = set().union(*(getattr(base, "model_fields", {}) for base in cls.__mro__[1:]))
    for name, field in cls.model_fields.items():
        if name in skip or name in inherited:
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


def _at_least(minimum: int, value: str) -> int:
    number = int(value)
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
    return number


def positive(value: str) -> int:
    return _at_least(1, value)
