"""Every setting of rerankd, from flags, `RERANKD_*` environment variables or a TOML config file.

One pydantic-settings model per command family is the single source of truth: the command-line flags are
generated from its fields (name, type, default, help: `rerankd.cli.flags`), and the same fields read
`RERANKD_<NAME>` from the environment and `<name> = …` from the file given by `--config` (or
`RERANKD_CONFIG`). Precedence: flag > environment > file > default. List settings take JSON or
comma-separated values in the environment.

The settings object is resolved once, for the device a model runs on (`RuntimeSettings.for_device`), and
handed down as is: the backend, the engine and the API read their fields from it. It imports nothing of
rerankd but the catalog, so that every layer may read it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import BeforeValidator, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from rerankd.catalog import DEFAULT_MODEL

ENV_PREFIX = "RERANKD_"
DEFAULT_PORT = 8082
DEFAULT_CHUNK_OVERLAP = 64  # tokens shared by consecutive windows of a chunked document
# Where the user sets none: padded tokens per forward pass, and how long an idle queue waits to gather
# concurrent requests, per device type. Big CPU batches spill the caches while a GPU wants them big; a CPU
# pass of a few requests takes long enough that gathering them first pays, while on a GPU concurrent
# requests gather on their own behind the running pass (measurements: docs/decisions.md).
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "cuda": 16384}
DEFAULT_BATCH_WAIT_MS = {"cpu": 2.0, "cuda": 0.0}
DEFAULT_MAX_QUEUED_PAIRS = 4096


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

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", hide_input_in_errors=True)

    model_cache: Path = Field(Path("models"), description="where Hub downloads are kept")
    revision: str | None = Field(None, description="Hub branch, tag or commit to pin (default: main)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8", "bfloat16-mixed"] = Field(
        "auto",
        description="compute dtype; int8 = the dense layers in int8 through oneDNN, on a CPU (DeBERTa's "
        "attention in bfloat16 where the CPU has bf16 units); bfloat16-mixed "
        "= DeBERTa's dense layers and attention in bfloat16, its residual stream and norms in float32, on a "
        "CPU; auto = the first that holds the model's validation scores within 0.01 of float32: float16 on "
        "CUDA, bfloat16 then bfloat16-mixed on CPUs with AMX/AVX512-BF16, int8 on other x86 CPUs; else "
        "float32",
    )
    max_length: int | None = Field(
        None, ge=8, description="truncate pairs to this many tokens (default: the model's, 512)"
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="padded tokens per forward pass, batch x longest pair "
        f"(default: {DEFAULT_BATCH_TOKENS['cpu']} on CPU, {DEFAULT_BATCH_TOKENS['cuda']} on CUDA)",
    )
    max_batch_pairs: int = Field(64, ge=1, description="pairs per forward pass")
    batch_wait_ms: float | None = Field(
        None,
        ge=0,
        description="ms an idle queue waits to gather concurrent requests into one batch "
        f"(default: {DEFAULT_BATCH_WAIT_MS['cpu']:g} on CPU, {DEFAULT_BATCH_WAIT_MS['cuda']:g} on CUDA)",
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads for the forward pass (default: torch's choice, one per core)"
    )
    cuda_graphs: bool = Field(
        True,
        description="on CUDA, replay each batch's pass as a CUDA graph captured per bucketed batch shape "
        "(the torch backend; --no-cuda-graphs runs it kernel by kernel)",
    )
    backend: Literal["auto", "torch", "gguf", "llamacpp", "onnx", "openvino"] = Field(
        "auto",
        description="what runs the model; auto = torch for safetensors and DeBERTa GGUF, llamacpp for the "
        "GGUF rerankers llama.cpp serves (BERT, XLM-RoBERTa, Jina-BERT, ModernBERT), onnx (ONNX Runtime) "
        "for ONNX graphs; openvino runs an ONNX graph on OpenVINO",
    )
    max_queued_pairs: int | None = Field(
        DEFAULT_MAX_QUEUED_PAIRS,
        ge=1,
        description="pairs waiting per model (queued or being tokenized); a request that would pass it gets "
        "429 unless it is within its fair share of the queue, the limit over the requests waiting",
    )

    def for_device(self, device: str) -> Self:
        """These settings for a model that runs on `device` (`cpu`, `cuda`, `cuda:N`): the device is set and
        the batching limits the user left open take that device type's defaults."""
        kind = device.split(":")[0] if device.split(":")[0] in DEFAULT_BATCH_TOKENS else "cpu"
        tokens = DEFAULT_BATCH_TOKENS[kind] if self.max_batch_tokens is None else self.max_batch_tokens
        wait = DEFAULT_BATCH_WAIT_MS[kind] if self.batch_wait_ms is None else self.batch_wait_ms
        return self.model_copy(update={"device": device, "max_batch_tokens": tokens, "batch_wait_ms": wait})

    @property
    def batch_tokens(self) -> int:
        """The padded-token budget per forward pass, once resolved for a device (`for_device`)."""
        if self.max_batch_tokens is None:
            raise ValueError("resolve the settings for a device first (RuntimeSettings.for_device)")
        return self.max_batch_tokens

    @property
    def batch_wait_seconds(self) -> float:
        """How long an idle queue waits, once resolved for a device (`for_device`)."""
        if self.batch_wait_ms is None:
            raise ValueError("resolve the settings for a device first (RuntimeSettings.for_device)")
        return self.batch_wait_ms / 1000


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
    max_chunks_per_doc: int = Field(64, ge=1, description="token windows per document in chunk mode, at most")
    chunk_overlap: int = Field(
        DEFAULT_CHUNK_OVERLAP, ge=0, description="tokens shared by consecutive windows of a chunked document"
    )
    max_request_pairs: int | None = Field(
        None,
        ge=1,
        description="(query, window) pairs one request may make, chunk mode's windows included (more: 413; "
        "default: --max-documents)",
    )
    request_timeout: float | None = Field(
        300.0,
        gt=0,
        description="seconds a request may take from its first byte, upload included; its queued work is "
        "then dropped (504)",
    )
    header_timeout: float = Field(
        10.0, gt=0, description="seconds a connection may take to send a request's headers (then closed)"
    )
    body_timeout: float = Field(
        60.0, gt=0, description="seconds a request body may take to arrive (more: 408)"
    )
    keep_alive_timeout: float = Field(
        5.0, gt=0, description="seconds an idle keep-alive connection is kept open between requests"
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="open connections at most; past it a new connection gets 503 and is closed (default: the "
        "open-files limit, raised to its hard limit, less a reserve for models and logs)",
    )
    max_body_bytes_in_flight: int | None = Field(
        None,
        ge=1024,
        description="request-body bytes read or parsed at once across requests; a request that would pass it "
        "gets 503 before its body is read (default: 4 x --max-request-bytes)",
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

    @field_validator("api_key", mode="before")
    @classmethod
    def _usable_api_keys(cls, value: Any) -> Any:
        """Refuse, rather than strip, an empty key or one with whitespace at either end: an empty key would
        let a request without a key through, and HTTP drops a header's surrounding whitespace, so no client
        could send the other. Checked as written, before `_split_commas` strips the comma-separated form (in
        which whitespace next to a comma only separates keys: `a, b`). Keys are compared as UTF-8, so an
        environment variable's undecodable bytes are refused too. The messages never quote a key."""
        comma_separated = isinstance(value, str) and not value.startswith("[")
        written = re.split(r"\s*,\s*", value) if comma_separated else _split_commas(value)
        for key in written if isinstance(written, list) else []:
            if not isinstance(key, str):
                continue  # the list's own validation refuses it
            if not key:
                raise ValueError("an API key is empty (leave the setting unset to serve without keys)")
            if key != key.strip():
                raise ValueError("an API key starts or ends with whitespace, which no client can send")
            if any("\ud800" <= char <= "\udfff" for char in key):
                raise ValueError("an API key is not valid UTF-8")
        return value

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
