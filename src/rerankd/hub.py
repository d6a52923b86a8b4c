"""Find the model files to serve: a local folder, or a Hub repo downloaded into a pinned, verified cache.

Downloads go through `huggingface_hub` (standard cache layout, `HF_ENDPOINT`, `HF_HUB_OFFLINE` and `HF_TOKEN`
behave as usual). On top of it we fall back to the cache when the Hub is unreachable, turn library errors into
messages that say what to do, and keep a sha256 manifest per commit so a silently corrupted cache is caught
instead of producing wrong scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id

from rerankd.catalog import DEFAULT_MODEL, canonical_repo_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileSelection:
    """Which files of a Hub repo make up one servable model."""

    description: str  # what the files are, for messages ("a safetensors checkpoint")
    allow_patterns: tuple[str, ...]  # everything to download
    required_patterns: tuple[str, ...]  # a snapshot lacking any of these is an error, not a model
    follow_aliases: bool  # aliases name the safetensors checkpoint of the same weights


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spm.model",
)
SAFETENSORS_FILES = FileSelection(
    description="a safetensors checkpoint",
    allow_patterns=("config.json", "*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES),
    required_patterns=("config.json", "*.safetensors"),
    follow_aliases=True,
)


def onnx_files(name: str) -> FileSelection:
    """One ONNX graph (`model.onnx`, `model_int8.onnx`, …) in `onnx/` or at the root, with its external data
    (`<name>_data`, `<name>.data`, numbered parts) and the config and tokenizer files beside it."""
    graph = (f"onnx/{name}", name)
    data = tuple(f"{pattern}_data*" for pattern in graph) + tuple(f"{pattern}.data*" for pattern in graph)
    return FileSelection(
        description=f"an ONNX graph {name}",
        allow_patterns=(*graph, *data, "config.json", *TOKENIZER_FILES),
        required_patterns=("config.json", f"*{name}"),
        follow_aliases=True,
    )


GGUF_SIDECARS = ("config.json", "tokenizer.json", "model_manifest.json", "antfly_inference_variants.json")


def gguf_files(variant: str) -> FileSelection:
    """One GGUF variant (`<model>.<Q8_0|Q4_K|F16|F32>.gguf`) and its sidecars, as Antfly publishes them."""
    pattern = f"*.{variant}.gguf"
    return FileSelection(
        description=f"a {variant} GGUF file",
        allow_patterns=(pattern, *GGUF_SIDECARS),
        required_patterns=(pattern,),
        follow_aliases=False,
    )


_PATH_PREFIXES: tuple[str, ...] = ("/", "./", "../", "~")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_MANIFESTS_FOLDER = "rerankd-manifests"
_HASH_CHUNK_BYTES = 1 << 20
_LOCAL_FOLDER_ADVICE = (
    "pass a local folder instead: --model /path/to/folder holding config.json, model.safetensors and the "
    "tokenizer files (tokenizer.json, tokenizer_config.json, spm.model)"
)
# Errors that mean "the Hub could not be asked", as opposed to "the Hub answered no".
_HUB_UNREACHABLE_ERRORS = (OfflineModeIsEnabled, httpx2.TransportError, LocalEntryNotFoundError)


class ModelSourceError(Exception):
    """User-facing: the message names the model and says what to do."""


@dataclass(frozen=True)
class ModelSource:
    """Where the model files are and, for a Hub model, exactly which commit they are."""

    path: Path
    repo_id: str | None
    commit: str | None


def resolve_model_source(
    model: str,
    revision: str | None = None,
    cache_dir: Path | str = "models",
    files: FileSelection = SAFETENSORS_FILES,
) -> ModelSource:
    """Turn `--model`/`--revision` into a folder of files that are known to belong to one exact commit."""
    local_path = _existing_local_path(model)
    if local_path is not None:
        if revision is not None:
            logger.warning("Ignoring revision %r: model %s is a local path", revision, local_path)
        return ModelSource(local_path, None, None)

    repo_id = _hub_repo_id(model, files.follow_aliases)
    if repo_id != model:
        logger.info("Model %s is an alias of Hub repository %s", model, repo_id)
    cache_dir = Path(cache_dir).expanduser()
    patterns = list(files.allow_patterns)
    snapshot, origin = _fetch_snapshot(model, repo_id, revision, cache_dir, patterns)
    commit = snapshot.name
    served_files = sorted(filter_repo_objects(_relative_files(snapshot), allow_patterns=patterns))
    _check_required_files(model, repo_id, commit, files, served_files)
    _record_or_verify_manifest(snapshot, repo_id, revision, commit, cache_dir, patterns, served_files)
    logger.info(
        "Resolved %s revision %s to commit %s from %s (%s)",
        repo_id,
        revision or constants.DEFAULT_REVISION,
        commit,
        origin,
        snapshot,
    )
    return ModelSource(snapshot, repo_id, commit)


def _existing_local_path(model: str) -> Path | None:
    """A local folder (or single file) wins over a Hub id; a path-looking string that is missing is a typo."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.startswith(_PATH_PREFIXES) or "\\" in model:
        raise ModelSourceError(
            f"model folder {model!r} does not exist: pass an existing folder holding config.json, "
            f"model.safetensors and the tokenizer files, or a Hub repo id such as {DEFAULT_MODEL}"
        )
    return None


def _hub_repo_id(model: str, follow_aliases: bool) -> str:
    repo_id = canonical_repo_id(model) if follow_aliases else model
    advice = f"pass a Hub repo id of the form org/name (e.g. {DEFAULT_MODEL}) or an existing local folder"
    if repo_id.count("/") != 1:
        raise ModelSourceError(
            f"model {model!r} is neither an existing local path nor a Hub repo id: {advice}"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ModelSourceError(f"model {model!r} is not a valid Hub repo id ({error}): {advice}") from error
    return repo_id


def _fetch_snapshot(
    model: str, repo_id: str, revision: str | None, cache_dir: Path, patterns: list[str]
) -> tuple[Path, str]:
    """Return the snapshot folder and where it came from (for the log)."""
    if revision is not None and _COMMIT_SHA.fullmatch(revision):
        # A commit never changes, so a complete cached snapshot of it is authoritative: no need for the Hub.
        cached = _cached_snapshot(repo_id, revision, cache_dir, patterns)
        if cached is not None:
            return cached, "the local cache (pinned commit)"
    try:
        # snapshot_download quietly serves the cache when the Hub is unreachable, which would hide where
        # the files came from, and for a pinned commit it lists files with retries and backoff (about 23 s
        # when offline). Asking for the repo info first fails fast (one request, no retries), tells us which
        # case we are in, and reports "not found" before anything is downloaded.
        HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        downloaded = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns
        )
        return Path(downloaded), "the Hub"
    except _HUB_UNREACHABLE_ERRORS as error:
        unreachable: Exception = error
    except HfHubHTTPError as error:
        if error.response.status_code < 500:
            raise _hub_refusal(model, repo_id, revision, error) from error
        unreachable = error
    cached = _cached_snapshot(repo_id, revision, cache_dir, patterns)
    if cached is None:
        raise ModelSourceError(
            f"model {model!r} (Hub repository {repo_id}, revision {revision or constants.DEFAULT_REVISION}) "
            f"is not (completely) in the local cache {cache_dir} and the Hub could not be reached "
            f"({type(unreachable).__name__}: {unreachable}). Connect to the network (or set HF_ENDPOINT to a "
            f"reachable mirror), or {_LOCAL_FOLDER_ADVICE}."
        ) from unreachable
    return cached, f"the local cache (Hub unreachable: {type(unreachable).__name__})"


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: Path, patterns: list[str]) -> Path | None:
    try:
        cached = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns, local_files_only=True
        )
    except LocalEntryNotFoundError:  # also raised when the cached snapshot lacks requested files
        return None
    return Path(cached)


def _hub_refusal(model: str, repo_id: str, revision: str | None, error: HfHubHTTPError) -> ModelSourceError:
    """Say why the Hub answered no, and what to change; these are not worth a cache fallback."""
    if isinstance(error, GatedRepoError):
        return ModelSourceError(
            f"model {model!r}: Hub repository {repo_id} is gated. Accept its terms at "
            f"{constants.ENDPOINT}/{repo_id} and set HF_TOKEN to a token of an account with access, "
            f"or {_LOCAL_FOLDER_ADVICE}."
        )
    if isinstance(error, RepositoryNotFoundError):
        return ModelSourceError(
            f"model {model!r}: Hub repository {repo_id} was not found (or it is private and HF_TOKEN "
            f"does not grant access). Check the name (e.g. {DEFAULT_MODEL}), or {_LOCAL_FOLDER_ADVICE}."
        )
    if isinstance(error, RevisionNotFoundError):
        return ModelSourceError(
            f"model {model!r}: revision {revision!r} was not found in Hub repository {repo_id}. "
            "Pass a branch, tag or commit sha that exists with --revision, or leave it out for main."
        )
    status = error.response.status_code
    if status in (401, 403):
        return ModelSourceError(
            f"model {model!r}: the Hub denied access to {repo_id} (HTTP {status}). "
            f"Set HF_TOKEN to a token with read access, or {_LOCAL_FOLDER_ADVICE}."
        )
    return ModelSourceError(f"model {model!r}: the Hub refused to serve {repo_id} (HTTP {status}: {error}).")


def _relative_files(folder: Path) -> list[str]:
    return [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]


def _check_required_files(
    model: str, repo_id: str, commit: str, files: FileSelection, served_files: list[str]
) -> None:
    missing = [
        required
        for required in files.required_patterns
        if not any(filter_repo_objects(served_files, allow_patterns=required))
    ]
    if missing:
        raise ModelSourceError(
            f"model {model!r}: Hub repository {repo_id} at commit {commit} has no {' and no '.join(missing)} "
            f"(it has: {', '.join(served_files) or 'none of the requested files'}). rerankd needs "
            f"{files.description}: pick a repository or --revision that has one, "
            f"or {_LOCAL_FOLDER_ADVICE}."
        )


def _record_or_verify_manifest(
    snapshot: Path,
    repo_id: str,
    revision: str | None,
    commit: str,
    cache_dir: Path,
    patterns: list[str],
    served_files: list[str],
) -> None:
    """First sight of a commit records file hashes; later runs check the files still match them.

    Entries are never changed once recorded. Files not yet recorded (a later call asking for other patterns)
    are added, so every file we ever serve is covered.
    """
    manifest_path = cache_dir / _MANIFESTS_FOLDER / repo_id.replace("/", "--") / f"{commit}.json"
    repo_folder = snapshot.parents[1]
    if not manifest_path.exists():
        files = {name: _sha256(snapshot / name) for name in served_files}
        manifest = {"repo_id": repo_id, "revision": revision, "commit": commit, "files": files}
        _write_json_atomically(manifest_path, manifest)
        logger.info("Recorded sha256 manifest of %d files at %s", len(files), manifest_path)
        return

    try:
        manifest = json.loads(manifest_path.read_text())
        recorded: dict[str, str] = manifest["files"]
    except (ValueError, KeyError) as error:
        raise ModelSourceError(
            f"model {repo_id}: integrity manifest {manifest_path} is unreadable ({error}); delete it and "
            f"{repo_folder} to re-download."
        ) from error
    for name in filter_repo_objects(sorted(recorded), allow_patterns=patterns):
        problem = _verification_problem(snapshot / name, recorded[name])
        if problem is not None:
            raise ModelSourceError(
                f"model {repo_id} commit {commit}: cached file {name} {problem} ({manifest_path}). "
                f"The cache is corrupt: delete {repo_folder} to re-download."
            )
    unrecorded = [name for name in served_files if name not in recorded]
    if unrecorded:
        manifest["files"] = {**recorded, **{name: _sha256(snapshot / name) for name in unrecorded}}
        _write_json_atomically(manifest_path, manifest)
    logger.info("Verified cached files of %s commit %s against %s", repo_id, commit, manifest_path)


def _verification_problem(cached_file: Path, recorded_sha256: str) -> str | None:
    if not cached_file.is_file():
        return "is missing"
    if _sha256(cached_file) != recorded_sha256:
        return "does not match its recorded sha256"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json_atomically(path: Path, content: dict) -> None:
    """Readers (and a crash mid-write) must never see a half-written manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as stream:
            json.dump(content, stream, indent=2, sort_keys=True)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
