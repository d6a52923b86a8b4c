"""Settings: one model per command family, read from flags, RERANKD_* variables and a TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from rerankd.cli import build_parser
from rerankd.cli.flags import given_flags
from rerankd.settings import RuntimeSettings, ServeSettings, load_settings

README = Path(__file__).resolve().parents[1] / "README.md"


def serve_settings(argv: list[str], config: Path | None = None) -> ServeSettings:
    args = build_parser().parse_args(["serve", *argv])
    return load_settings(ServeSettings, given_flags(args, ServeSettings), config or args.config)


def test_a_flag_beats_the_environment_which_beats_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "rerankd.toml"
    config.write_text('max_documents = 5\nport = 9001\nhost = "0.0.0.0"\napi_key = ["from-file"]\n')
    monkeypatch.setenv("RERANKD_MAX_DOCUMENTS", "7")
    monkeypatch.setenv("RERANKD_PORT", "9002")
    settings = serve_settings(["--config", str(config), "--port", "9003"])
    assert settings.port == 9003  # flag
    assert settings.max_documents == 7  # environment
    assert settings.host == "0.0.0.0" and settings.api_key == ["from-file"]  # file
    assert settings.max_batch_pairs == 64  # default


def test_lists_come_from_repeated_flags_or_comma_separated_or_json_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert serve_settings(["--api-key", "a", "--api-key", "b"]).api_key == ["a", "b"]
    monkeypatch.setenv("RERANKD_API_KEY", "x, y")
    monkeypatch.setenv("RERANKD_MODEL", '["one=/models/a", "/models/b"]')
    settings = serve_settings([])
    assert settings.api_key == ["x", "y"]
    assert settings.served_models() == [("one", "/models/a"), ("/models/b", "/models/b")]


def test_served_names(tmp_path: Path) -> None:
    settings = serve_settings(
        ["--model", "/m/a", "--model", "alias=mixedbread-ai/x", "--served-model-name", "A"]
    )
    assert settings.served_models() == [("A", "/m/a"), ("alias", "mixedbread-ai/x")]
    odd = tmp_path / "with=sign"
    odd.mkdir()
    assert serve_settings(["--model", str(odd)]).served_models() == [(str(odd), str(odd))]


def test_bad_values_are_refused_with_the_setting_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RERANKD_MAX_DOCUMENTS", "0")
    with pytest.raises(ValidationError, match="max_documents"):
        serve_settings([])
    monkeypatch.delenv("RERANKD_MAX_DOCUMENTS")
    (tmp_path / "bad.toml").write_text("no_such_setting = 1\n")
    with pytest.raises(ValidationError, match="no_such_setting"):
        serve_settings([], tmp_path / "bad.toml")
    with pytest.raises(ValueError, match="does not exist"):
        serve_settings([], tmp_path / "missing.toml")


def test_runtime_settings_reach_every_model_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANKD_DEVICE", "cpu")
    args = build_parser().parse_args(["rank", "--query", "q", "--max-batch-pairs", "3", "doc"])
    runtime = load_settings(RuntimeSettings, given_flags(args, RuntimeSettings))
    assert runtime.device == "cpu" and runtime.max_batch_pairs == 3


def test_the_readme_lists_every_setting() -> None:
    text = README.read_text()
    for name in ServeSettings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in text, name
    for endpoint in ("/health", "/ready", "/metrics", "/info", "/models", "/v1/models"):
        assert f"`GET {endpoint}`" in text, endpoint


def test_the_batching_limits_take_the_devices_defaults_unless_the_user_set_them() -> None:
    assert RuntimeSettings().for_device("cpu").batch_tokens == 1024
    assert RuntimeSettings().for_device("cuda:1").batch_tokens == 16384
    assert RuntimeSettings(max_batch_tokens=700).for_device("cuda").batch_tokens == 700
    assert RuntimeSettings().for_device("cpu").batch_wait_seconds == 0.002
    assert RuntimeSettings().for_device("cuda").batch_wait_seconds == 0.0
    assert RuntimeSettings(batch_wait_ms=5).for_device("cuda").batch_wait_seconds == 0.005
    assert RuntimeSettings(batch_wait_ms=0).for_device("cpu").batch_wait_seconds == 0
    resolved = RuntimeSettings(device="auto", max_batch_pairs=8).for_device("cuda:1")
    assert (resolved.device, resolved.max_batch_pairs) == ("cuda:1", 8)
    with pytest.raises(ValueError, match="resolve the settings for a device first"):
        _ = RuntimeSettings().batch_tokens
