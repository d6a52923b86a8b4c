"""Every setting of rerankd, from flags, `RERANKD_*` environment variables or a TOML config file.

One pydantic-settings model per command family is the single source of truth: the command-line flags are
generated from its fields (name, type, default, help), and the same fields read `RERANKD_<NAME>` from the
environment and `<name> = …` from the file given by `--config` (or `RERANKD_CONFIG`). Precedence: flag >
environment > file > default. List settings take JSON or comma-separated values in the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BeforeValidator, Field
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from rerankd.catalog import DEFAULT_MODEL
from rerankd.engine.tokenize import DEFAULT_CHUNK_OVERLAP

ENV_PREFIX = "RERANKD_"
DEFAULT_PORT = 8082


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


SettingsT = TypeVar("SettingsT", bound=BaseSettings)
StringList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]


class RuntimeSettings(BaseSettings):
    """How models are found and run: shared by every command that loads a model."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    model_cache: Path = Field(Path("models"), description="where Hub downloads are kept")
    revision: str | None = Field(None, description="Hub branch, tag or commit to pin (default: main)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="compute dtype; auto = float16 on CUDA and bfloat16 on CPUs with AMX/AVX512-BF16 when "
        "the model's validation scores hold within 0.01 of float32, else float32",
    )
    max_length: int | None = Field(
        None, ge=8, description="truncate pairs to this many tokens (default: the model's, 512)"
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="padded tokens per forward pass, batch x longest pair "
        "(default: 1024 on CPU, 16384 on CUDA)",
    )
    max_batch_pairs: int = Field(64, ge=1, description="pairs per forward pass")
    batch_wait_ms: float | None = Field(
        None,
        ge=0,
        description="ms an idle queue waits to gather concurrent requests into one batch "
        "(default: 2 on CPU, 0 on CUDA)",
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads for the forward pass (default: torch's choice, one per core)"
    )
    cuda_graphs: bool = Field(
        True,
        description="on CUDA, replay each batch's pass as a CUDA graph captured per bucketed batch shape "
        "(the torch backend; --no-cuda-graphs runs it kernel by kernel)",
    )
    backend: Literal["auto", "torch", "gguf", "llamacpp"] = Field(
        "auto",
        description="what runs the model; auto = torch for safetensors and DeBERTa GGUF, llamacpp for the "
        "GGUF rerankers llama.cpp serves (BERT, XLM-RoBERTa, Jina-BERT, ModernBERT)",
    )


class ServeSettings(RuntimeSettings):
    """`rerankd serve`: the models, the HTTP side, limits, security and lifecycle."""

    model: StringList = Field(
        [DEFAULT_MODEL],
        min_length=1,
        description="a model to serve (repeatable): local folder, .gguf, or Hub id; `name=model` serves it "
        "under that name; the first is the default",
    )
    served_model_name: str | None = Field(None, description="name clients use for the first model")
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 to accept other hosts)")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="port to bind")
    max_documents: int = Field(1000, ge=1, description="documents per request (more: 413)")
    max_document_chars: int = Field(100_000, ge=1, description="characters per document or query (more: 413)")
    max_request_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="bytes of a request body (more: 413)"
    )
    max_queued_pairs: int | None = Field(
        None,
        ge=1,
        description="pairs waiting per model; a request that would pass it gets 429 (default: none)",
    )
    max_chunks_per_doc: int = Field(64, ge=1, description="token windows per document in chunk mode, at most")
    chunk_overlap: int = Field(
        DEFAULT_CHUNK_OVERLAP, ge=0, description="tokens shared by consecutive windows of a chunked document"
    )
    request_timeout: float | None = Field(
        None, gt=0, description="seconds a request may take; its queued work is then dropped (504)"
    )
    api_key: StringList = Field(
        [], description="accepted API keys (repeatable; `Authorization: Bearer KEY`); none: no auth"
    )
    metrics_auth: bool = Field(False, description="require an API key for /metrics too")
    cors_origin: StringList = Field([], description="origins allowed by CORS (repeatable; `*` for any)")
    shutdown_timeout: float = Field(
        30.0, ge=0, description="seconds in-flight requests get to finish after SIGTERM"
    )
    warmup: bool = Field(True, description="score a small request with each model before it is ready")
    log_format: Literal["json", "text"] = Field("json", description="request log lines as JSON or text")

    def served_models(self) -> list[tuple[str, str]]:
        """(served name, model reference) per model, first the default."""
        pairs = []
        for position, entry in enumerate(self.model):
            name, separator, reference = entry.partition("=")
            if separator and name and reference and not Path(entry).exists():
                pairs.append((name, reference))
            elif position == 0 and self.served_model_name:
                pairs.append((self.served_model_name, entry))
            else:
                pairs.append((entry, entry))
        return pairs


def load_settings(
    cls: type[SettingsT], flags: Mapping[str, Any], config_file: Path | None = None
) -> SettingsT:
    """`cls` from flags (given ones only), then the environment, then the TOML file, then defaults."""
    if config_file is None and os.environ.get(f"{ENV_PREFIX}CONFIG"):
        config_file = Path(os.environ[f"{ENV_PREFIX}CONFIG"])
    if config_file is not None and not config_file.is_file():
        raise ValueError(f"config file {config_file} does not exist")

    class WithFile(cls):  # type: ignore[valid-type, misc]
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            if config_file is None:
                return init_settings, env_settings
            return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=config_file)

    WithFile.__name__ = cls.__name__
    return WithFile(**flags)


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
