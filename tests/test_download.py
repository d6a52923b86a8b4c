"""`rerankd download`, run as a user runs it (a process), against a fake Hub on loopback.

It reads serve's settings (flags, environment, config file) and fetches into the model cache the files
`rerankd serve` would load for each model, and nothing else; later runs find them there with the Hub gone;
a model it cannot fetch fails it with one line naming the model. The files here are placeholders: nothing is
loaded (tests/test_kubernetes.py serves what the command fetched).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fakehub import FakeHub, closed_loopback_url
from serving import run_cli

REPO_ID = "rerankd-tests/reranker"
pytestmark = [pytest.mark.slow, pytest.mark.network]  # each test runs the CLI as a process, over loopback

SAFETENSORS = {"config.json", "model.safetensors", "tokenizer.json"}


def repo_files() -> dict[str, bytes]:
    """Every format rerankd serves, side by side, and a file none of them needs."""
    return {
        "config.json": b'{"model_type": "bert"}',
        "model.safetensors": b"weights" * 1000,
        "tokenizer.json": b"{}",
        "onnx/model.onnx": b"float32 graph",
        "onnx/model_int8.onnx": b"int8 graph",
        "reranker.Q8_0.gguf": b"gguf",
        "README.md": b"# reranker\n",
    }


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as fake_hub:
        yield fake_hub


@pytest.fixture
def commit(hub: FakeHub) -> str:
    return hub.add_repo(REPO_ID).commit(repo_files())


def online(hub: FakeHub) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}


def cached_files(cache: Path, commit: str) -> set[str]:
    snapshot = cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / commit
    return {path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file()}


def error_line(stderr: str) -> str:
    """The command's own message, which must hold on one line."""
    (line,) = [line for line in stderr.splitlines() if line.startswith("rerankd download: ")]
    assert "Traceback" not in stderr
    return line


@pytest.mark.parametrize(
    ("model_flags", "expected"),
    [
        ((REPO_ID,), SAFETENSORS),
        ((REPO_ID, "--backend", "onnx"), {"config.json", "tokenizer.json", "onnx/model.onnx"}),
        ((f"{REPO_ID}:onnx:int8",), {"config.json", "tokenizer.json", "onnx/model_int8.onnx"}),
        ((f"{REPO_ID}:gguf:Q8_0",), {"config.json", "tokenizer.json", "reranker.Q8_0.gguf"}),
    ],
    ids=["safetensors", "onnx-backend", "onnx-selector", "gguf-selector"],
)
def test_fetches_exactly_what_serve_loads(
    hub: FakeHub, commit: str, tmp_path: Path, model_flags: tuple[str, ...], expected: set[str]
) -> None:
    result = run_cli("download", "--model-cache", str(tmp_path), "--model", *model_flags, env=online(hub))
    assert result.returncode == 0, result.stderr
    assert set(hub.fetched_files(REPO_ID)) == expected
    assert cached_files(tmp_path, commit) == expected
    assert f"revision main to commit {commit} from the Hub" in result.stderr
    assert f"is in the cache at commit {commit}" in result.stderr


def test_later_runs_find_the_cache_with_the_hub_gone(hub: FakeHub, commit: str, tmp_path: Path) -> None:
    """Settings from the environment this time, as a container gets them."""
    settings = {"RERANKD_MODEL": REPO_ID, "RERANKD_MODEL_CACHE": str(tmp_path)}
    assert run_cli("download", env={**settings, **online(hub)}).returncode == 0
    hub.stop()

    offline = run_cli("download", env={**settings, **online(hub), "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert f"to commit {commit} from the local cache (Hub unreachable: OfflineMode" in offline.stderr

    pinned = run_cli("download", env={**settings, **online(hub), "RERANKD_REVISION": commit})
    assert pinned.returncode == 0, pinned.stderr
    assert f"to commit {commit} from the local cache (pinned commit)" in pinned.stderr
    assert cached_files(tmp_path, commit) == SAFETENSORS


def test_reads_serves_config_file_whole(hub: FakeHub, commit: str, tmp_path: Path) -> None:
    """A file written for `rerankd serve --config`, its server settings and served names included."""
    config = tmp_path / "rerankd.toml"
    cache = tmp_path / "cache"
    config.write_text(
        f'model = ["reranker={REPO_ID}"]\nmodel_cache = "{cache}"\nport = 9000\napi_key = ["a-key"]\n'
    )
    result = run_cli("download", "--config", str(config), env=online(hub))
    assert result.returncode == 0, result.stderr
    assert cached_files(cache, commit) == SAFETENSORS


def test_invalid_settings_exit_2_naming_the_setting(tmp_path: Path) -> None:
    result = run_cli("download", "--model-cache", str(tmp_path), env={"RERANKD_PORT": "99999"})
    assert result.returncode == 2
    assert error_line(result.stderr).startswith("rerankd download: invalid settings: port: ")


def test_unknown_repo_fails_naming_it_after_fetching_the_others(
    hub: FakeHub, commit: str, tmp_path: Path
) -> None:
    absent = "rerankd-tests/absent"
    result = run_cli(
        "download", "--model-cache", str(tmp_path), "--model", absent, "--model", REPO_ID, env=online(hub)
    )
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert f"Hub repository {absent} was not found" in line and "Check the name" in line
    assert cached_files(tmp_path, commit) == SAFETENSORS


def test_unreachable_hub_without_a_cached_copy_fails_naming_the_model(tmp_path: Path) -> None:
    result = run_cli(
        "download",
        "--model-cache",
        str(tmp_path),
        "--model",
        REPO_ID,
        env={"HF_ENDPOINT": closed_loopback_url(), "HF_HUB_OFFLINE": "0"},
    )
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert f"model {REPO_ID!r}" in line and "the Hub could not be reached" in line
    assert "Connect to the network" in line
