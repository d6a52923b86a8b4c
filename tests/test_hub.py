"""Model source resolution with the unmodified huggingface_hub against a fake Hub served over loopback."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from rerankd.hub import ModelSourceError, resolve_model_source

from fakehub import ConnectionDropper, FakeHub, FakeRepo, closed_loopback_url, point_huggingface_hub_at

REPO_ID = "mixedbread-ai/mxbai-rerank-base-v1"
# Downloads over loopback: a hang ends the test (pytest-timeout) instead of blocking CI.
pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]


def model_files(version: str) -> dict[str, bytes]:
    """A reranker repo as on the Hub, plus files that a safetensors reranker must not download."""
    return {
        "config.json": json.dumps({"model_type": "deberta-v2", "version": version}).encode(),
        "model.safetensors": f"weights {version}".encode() * 1000,
        "tokenizer.json": b'{"version": "1.0"}',
        "README.md": b"# mxbai-rerank-base-v1\n",
        "onnx/model.onnx": b"onnx weights",
    }


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub() as fake_hub:
        point_huggingface_hub_at(monkeypatch, fake_hub.url)
        yield fake_hub


@pytest.fixture
def repo(hub: FakeHub) -> FakeRepo:
    fake_repo = hub.add_repo(REPO_ID)
    fake_repo.commit(model_files("v1"))
    return fake_repo


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_of(cache_dir: Path, commit: str) -> dict:
    manifests = cache_dir / "rerankd-manifests" / "mixedbread-ai--mxbai-rerank-base-v1"
    return json.loads((manifests / f"{commit}.json").read_text())


def test_downloads_only_the_requested_files_and_records_their_sha256(
    hub: FakeHub, repo: FakeRepo, tmp_path: Path
) -> None:
    source = resolve_model_source(REPO_ID, cache_dir=tmp_path)

    files = repo.commits[repo.branches["main"]]
    assert source.repo_id == REPO_ID
    assert source.commit == repo.branches["main"]
    assert (
        source.path == tmp_path / "models--mixedbread-ai--mxbai-rerank-base-v1" / "snapshots" / source.commit
    )
    served = ("config.json", "model.safetensors", "tokenizer.json")
    assert sorted(
        p.relative_to(source.path).as_posix() for p in source.path.rglob("*") if p.is_file()
    ) == list(served)
    for name in served:
        assert (source.path / name).read_bytes() == files[name]
    assert sorted(set(hub.fetched_files(REPO_ID))) == sorted(served)
    assert manifest_of(tmp_path, source.commit) == {
        "repo_id": REPO_ID,
        "revision": None,
        "commit": source.commit,
        "files": {name: sha256(files[name]) for name in served},
    }


def test_second_resolve_verifies_against_the_manifest_without_rewriting_it(
    hub: FakeHub, repo: FakeRepo, tmp_path: Path
) -> None:
    first = resolve_model_source(REPO_ID, cache_dir=tmp_path)
    manifest_path = next((tmp_path / "rerankd-manifests").rglob("*.json"))
    written_at = manifest_path.stat().st_mtime_ns

    assert resolve_model_source(REPO_ID, revision="main", cache_dir=tmp_path) == first
    assert manifest_path.stat().st_mtime_ns == written_at
    assert manifest_of(tmp_path, first.commit)["revision"] is None


def test_revision_pins_a_commit_or_a_branch(hub: FakeHub, repo: FakeRepo, tmp_path: Path) -> None:
    old_commit = repo.branches["main"]
    repo.branches["v1"] = old_commit
    new_commit = repo.commit(model_files("v2"))

    latest = resolve_model_source(REPO_ID, cache_dir=tmp_path)
    pinned = resolve_model_source(REPO_ID, revision=old_commit, cache_dir=tmp_path)
    branch = resolve_model_source(REPO_ID, revision="v1", cache_dir=tmp_path)

    assert latest.commit == new_commit
    assert json.loads((latest.path / "config.json").read_text())["version"] == "v2"
    assert pinned.commit == branch.commit == old_commit
    assert pinned.path == branch.path
    assert json.loads((pinned.path / "config.json").read_text())["version"] == "v1"
    assert (pinned.path / "model.safetensors").read_bytes() == model_files("v1")["model.safetensors"]
    assert manifest_of(tmp_path, old_commit)["revision"] == old_commit


def test_pinned_commit_already_in_the_cache_needs_no_request(
    hub: FakeHub, repo: FakeRepo, tmp_path: Path
) -> None:
    commit = repo.branches["main"]
    first = resolve_model_source(REPO_ID, revision=commit, cache_dir=tmp_path)
    requests_before = len(hub.requests)

    assert resolve_model_source(REPO_ID, revision=commit, cache_dir=tmp_path) == first
    assert len(hub.requests) == requests_before


def test_alias_downloads_from_the_canonical_repo(hub: FakeHub, repo: FakeRepo, tmp_path: Path) -> None:
    source = resolve_model_source("antflydb/mxbai-rerank-base-v1", cache_dir=tmp_path)

    assert source.repo_id == REPO_ID
    assert source.commit == repo.branches["main"]
    assert all(
        request.path.startswith(("/api/models/mixedbread-ai/", "/mixedbread-ai/")) for request in hub.requests
    )


def test_unreachable_hub_falls_back_to_the_verified_cache_and_detects_corruption(
    hub: FakeHub,
    repo: FakeRepo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="rerankd.hub")
    online = resolve_model_source(REPO_ID, cache_dir=tmp_path)
    assert f"commit {online.commit} from the Hub" in caplog.text
    hub.stop()
    point_huggingface_hub_at(monkeypatch, closed_loopback_url())
    caplog.clear()

    assert resolve_model_source(REPO_ID, cache_dir=tmp_path) == online
    assert f"commit {online.commit} from the local cache (Hub unreachable: ConnectError)" in caplog.text
    assert "Verified cached files" in caplog.text

    blob = (online.path / "model.safetensors").resolve()
    assert blob.parent.name == "blobs"
    blob.chmod(0o644)
    blob.write_bytes(b"tampered weights")
    with pytest.raises(ModelSourceError, match=r"model\.safetensors") as raised:
        resolve_model_source(REPO_ID, cache_dir=tmp_path)
    assert "corrupt" in str(raised.value)
    assert str(tmp_path / "models--mixedbread-ai--mxbai-rerank-base-v1") in str(raised.value)


def test_deleted_snapshot_file_is_restored_from_the_hub_and_verified(
    hub: FakeHub, repo: FakeRepo, tmp_path: Path
) -> None:
    source = resolve_model_source(REPO_ID, cache_dir=tmp_path)
    (source.path / "tokenizer.json").unlink()

    assert resolve_model_source(REPO_ID, revision=source.commit, cache_dir=tmp_path) == source
    assert (source.path / "tokenizer.json").read_bytes() == repo.commits[source.commit]["tokenizer.json"]


def test_file_recorded_in_the_manifest_but_missing_from_the_snapshot_is_reported(
    hub: FakeHub, repo: FakeRepo, tmp_path: Path
) -> None:
    source = resolve_model_source(REPO_ID, cache_dir=tmp_path)
    manifest_path = next((tmp_path / "rerankd-manifests").rglob("*.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["tokenizer_config.json"] = sha256(b"{}")
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(ModelSourceError, match=r"tokenizer_config\.json is missing.*corrupt"):
        resolve_model_source(REPO_ID, revision=source.commit, cache_dir=tmp_path)


def test_offline_mode_uses_the_cache_without_any_request(
    hub: FakeHub, repo: FakeRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = resolve_model_source(REPO_ID, cache_dir=tmp_path)
    requests_before = len(hub.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    assert resolve_model_source(REPO_ID, cache_dir=tmp_path) == online
    assert len(hub.requests) == requests_before


@pytest.mark.parametrize("revision", [None, "0123456789abcdef0123456789abcdef01234567"])
def test_no_network_and_no_cache_says_how_to_pass_a_local_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, revision: str | None
) -> None:
    """One attempt, no retries with backoff: snapshot_download alone retries for ~23 s when listing a pinned
    commit fails."""
    with ConnectionDropper() as unreachable:
        point_huggingface_hub_at(monkeypatch, unreachable.url)
        with pytest.raises(ModelSourceError) as raised:
            resolve_model_source(REPO_ID, revision=revision, cache_dir=tmp_path)
    assert unreachable.connections == 1

    message = str(raised.value)
    assert REPO_ID in message
    assert f"revision {revision or 'main'}" in message
    assert "could not be reached" in message
    assert "--model /path/to/folder" in message


def test_unknown_repo_is_reported_as_not_found(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"example-org/missing-model was not found"):
        resolve_model_source("example-org/missing-model", cache_dir=tmp_path)
    assert not list(tmp_path.rglob("snapshots"))


def test_unknown_revision_is_reported_as_not_found(hub: FakeHub, repo: FakeRepo, tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"revision 'v9' was not found in Hub repository"):
        resolve_model_source(REPO_ID, revision="v9", cache_dir=tmp_path)


def test_gated_repo_needs_hf_token(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gated = hub.add_repo("example-org/gated-reranker", gated_token="hf_secret")
    commit = gated.commit(model_files("v1"))

    with pytest.raises(ModelSourceError, match=r"is gated.*HF_TOKEN"):
        resolve_model_source("example-org/gated-reranker", cache_dir=tmp_path)

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert resolve_model_source("example-org/gated-reranker", cache_dir=tmp_path).commit == commit
    assert hub.requests[-1].authorization == "Bearer hf_secret"


def test_snapshot_without_safetensors_is_rejected(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo("example-org/pytorch-only").commit({"config.json": b"{}", "pytorch_model.bin": b"pickle"})

    with pytest.raises(ModelSourceError, match=r"has no \*\.safetensors"):
        resolve_model_source("example-org/pytorch-only", cache_dir=tmp_path)


def test_local_folder_or_file_is_returned_as_is_without_network(hub: FakeHub, tmp_path: Path) -> None:
    model_file = tmp_path / "reranker.gguf"
    model_file.write_bytes(b"GGUF")

    assert resolve_model_source(str(tmp_path)) == resolve_model_source(str(tmp_path), revision="main")
    assert resolve_model_source(str(tmp_path)).path == tmp_path
    assert resolve_model_source(str(model_file)).path == model_file
    assert resolve_model_source(str(model_file)).repo_id is None
    assert hub.requests == []


@pytest.mark.parametrize(
    "model", ["/no/such/folder", "./missing", "../missing", "~/missing-rerankd-model", "C:\\models\\x"]
)
def test_missing_path_is_an_error(hub: FakeHub, model: str) -> None:
    with pytest.raises(ModelSourceError, match=r"model folder .* does not exist"):
        resolve_model_source(model)
    assert hub.requests == []


@pytest.mark.parametrize("model", ["mxbai-rerank-base-v1", "a/b/c", "org/bad--name"])
def test_string_that_is_neither_path_nor_repo_id_is_an_error(hub: FakeHub, model: str) -> None:
    with pytest.raises(ModelSourceError, match=r"Hub repo id"):
        resolve_model_source(model)
    assert hub.requests == []
