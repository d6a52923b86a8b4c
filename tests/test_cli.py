"""The `rerankd` command line, run as a user would: a separate process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving import run_cli

pytestmark = pytest.mark.slow  # every test runs the CLI as a process

QUERY = "Who wrote To Kill a Mockingbird?"
DOCUMENTS = ["To Kill a Mockingbird is a novel by Harper Lee.", "Moby-Dick was written by Herman Melville."]


def test_rank_prints_the_ranking(xsmall_model_dir: Path) -> None:
    result = run_cli("rank", "--model", str(xsmall_model_dir), "--query", QUERY, *DOCUMENTS)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "index", "document"]
    assert len(lines) == 3
    assert {line.split()[2] for line in lines[1:]} == {"0", "1"}
    assert "UNTRAINED" in result.stderr


def test_rank_reads_documents_from_stdin_and_prints_json(xsmall_model_dir: Path) -> None:
    result = run_cli(
        "rank",
        "--model",
        str(xsmall_model_dir),
        "--query",
        QUERY,
        "--json",
        "--top-n",
        "1",
        stdin="\n".join(DOCUMENTS) + "\n\n",
    )
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert len(body["results"]) == 1
    assert body["results"][0]["document"] == DOCUMENTS[body["results"][0]["index"]]
    assert 0.0 < body["results"][0]["score"] < 1.0


def test_missing_local_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("rank", "--model", str(tmp_path / "absent"), "--query", "q", "d")
    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_hub_model_without_network_names_the_model_and_the_way_out(tmp_path: Path) -> None:
    result = run_cli(
        "rank",
        "--model",
        "mixedbread-ai/mxbai-rerank-xsmall-v1",
        "--model-cache",
        str(tmp_path),
        "--query",
        "q",
        "d",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert "mixedbread-ai/mxbai-rerank-xsmall-v1" in result.stderr
    assert "--model /path/to/folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_folder_that_is_not_a_model_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    result = run_cli("rank", "--model", str(tmp_path), "--query", "q", "d")
    assert result.returncode == 1
    assert "config.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_unsupported_config_is_refused_at_load(xsmall_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(xsmall_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "conv_kernel_size": 3}))
    result = run_cli("rank", "--model", str(folder), "--query", "q", "d")
    assert result.returncode == 1
    assert "conv_kernel_size" in result.stderr


def test_random_model_without_the_real_tokenizer_trains_one_and_serves(tmp_path: Path) -> None:
    """A user's clone has no ../shared: the fixture command still makes a working (untrained) model."""
    folder = tmp_path / "tiny"
    created = run_cli("random-model", str(folder), "--geometry", "xsmall", "--dtype", "float32")
    assert created.returncode == 0, created.stderr
    config = json.loads((folder / "config.json").read_text())
    assert config["rerankd_untrained"] is True
    assert config["vocab_size"] < 128100  # sized to the trained tokenizer
    # Readable like its neighbours (safetensors writes 0600), e.g. by a container's user.
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == (
        folder / "config.json"
    ).stat().st_mode & 0o777
    ranked = run_cli("rank", "--model", str(folder), "--query", QUERY, "--json", *DOCUMENTS)
    assert ranked.returncode == 0, ranked.stderr
    assert len(json.loads(ranked.stdout)["results"]) == 2


def test_console_script_and_version() -> None:
    script = Path(sys.executable).with_name("rerankd")
    if not script.exists():
        pytest.skip("package not installed with its console script (run through `make test`)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("rerankd ")
