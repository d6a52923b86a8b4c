"""A real HTTP server that speaks the part of the Hugging Face Hub protocol `snapshot_download` uses.

Tests drive the unmodified `huggingface_hub` client against it, so they exercise the real download, cache and
error paths without the network. Endpoints, as called by huggingface_hub 2.4.0:

- `GET /api/models/{org}/{name}` and `GET /api/models/{org}/{name}/revision/{rev}` (`HfApi.model_info`, which
  `snapshot_download` uses to turn a branch into a commit): `id`, `sha`, `gated`, `siblings`.
- `GET /api/models/{org}/{name}/tree/{rev}?recursive=true` (`HfApi.list_repo_tree`): every file with its size,
  git blob id and, for binary files, LFS metadata like the Hub's.
- `HEAD` and `GET /{org}/{name}/resolve/{rev}/{path}` (`hf_hub_download`): the file with `X-Repo-Commit`,
  `ETag` (git blob sha1, or sha256 for LFS files, as on the Hub) and `Content-Length`. No Xet headers are
  ever sent, so the client stays on plain HTTP.

Failures carry the `X-Error-Code` values huggingface_hub maps to its exceptions: `RepoNotFound`,
`RevisionNotFound`, `EntryNotFound` (404) and `GatedRepo` (401, for a gated repo asked without its token).
Every request is recorded so tests can assert what was (not) fetched.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from huggingface_hub import constants

# Files the Hub stores with Git LFS in model repos: their ETag is the sha256 of the content.
LFS_SUFFIXES: tuple[str, ...] = (".safetensors", ".bin", ".onnx", ".gguf", ".model")
_LFS_POINTER_SIZE = 134
# How often the server thread checks for `stop()`; the default (0.5 s) would dominate each test's teardown.
_SHUTDOWN_POLL_S = 0.02


@dataclass
class FakeRepo:
    """A model repo: commits hold whole file trees, branches point at commits."""

    repo_id: str
    gated_token: str | None = None
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def commit(self, files: dict[str, bytes], branch: str = "main") -> str:
        """Add a commit holding exactly `files`, move `branch` to it and return its 40-hex sha."""
        sha = hashlib.sha1(f"{self.repo_id}@{len(self.commits)}".encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        return revision if revision in self.commits else self.branches.get(revision)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    """Serves `repos` on 127.0.0.1 from a background thread; use as a context manager."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _SHUTDOWN_POLL_S},
            name="fakehub",
            daemon=True,
        )
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_repo(self, repo_id: str, gated_token: str | None = None) -> FakeRepo:
        self.repos[repo_id] = FakeRepo(repo_id, gated_token)
        return self.repos[repo_id]

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def fetched_files(self, repo_id: str) -> list[str]:
        """Paths of files whose metadata or content was requested (HEAD or GET on /resolve/)."""
        prefix = f"/{repo_id}/resolve/"
        return [
            request.path[len(prefix) :].split("/", 1)[1]
            for request in self.requests
            if request.path.startswith(prefix)
        ]

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Close the listening socket: afterwards connections to `url` are refused."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._thread.is_alive():
            self.stop()


def closed_loopback_url() -> str:
    """A loopback URL nothing listens on, so a connection attempt is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class ConnectionDropper:
    """A loopback port that accepts every connection and closes it at once, unanswered, and counts them: a
    Hub that cannot be reached, where each retry shows as one more connection."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._drop_connections, daemon=True)

    def _drop_connections(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:  # the listening socket was shut down
                return
            self.connections += 1
            connection.close()

    def __enter__(self) -> ConnectionDropper:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._socket.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        self._socket.close()
        self._thread.join(timeout=5)


def point_huggingface_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Aim huggingface_hub at `endpoint`, online, anonymous, without telemetry or Xet, with short timeouts.

    huggingface_hub reads these environment variables once, at import, into `huggingface_hub.constants`, and
    the download code reads them from there: setting the environment alone would not reach an already imported
    library, so both are set (the environment for anything that reads it later).
    """
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # Loopback answers in milliseconds; a short limit turns an unexpected hang into a quick failure.
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 5)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 5)


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


def _etag(path: str, content: bytes) -> str:
    return hashlib.sha256(content).hexdigest() if _is_lfs(path) else _git_blob_sha1(content)


def _tree_entry(path: str, content: bytes) -> dict:
    entry: dict = {"type": "file", "path": path, "size": len(content), "oid": _git_blob_sha1(content)}
    if _is_lfs(path):
        entry["lfs"] = {
            "oid": hashlib.sha256(content).hexdigest(),
            "size": len(content),
            "pointerSize": _LFS_POINTER_SIZE,
        }
    return entry


def _handler_class(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class FakeHubHandler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so no pooled connection outlives a stopped server.
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            self._serve(send_body=True)

        def do_HEAD(self) -> None:
            self._serve(send_body=False)

        def log_message(self, format: str, *args: object) -> None:
            """Keep test output clean; `FakeHub.requests` is the log."""

        def _serve(self, send_body: bool) -> None:
            url = urlsplit(self.path)
            hub.record(RecordedRequest(self.command, url.path, self.headers.get("Authorization")))
            # Split before unquoting: revisions arrive with "/" escaped as %2F, file paths with "/" kept.
            segments = [unquote(segment) for segment in url.path.split("/")[1:]]
            if segments[:2] == ["api", "models"] and len(segments) >= 4:
                self._serve_api(segments[2:], parse_qs(url.query), send_body)
            elif len(segments) >= 5 and segments[2] == "resolve":
                self._serve_file(
                    f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:]), send_body
                )
            else:
                self._send_error(404, None, f"no such endpoint: {url.path}", send_body)

        def _serve_api(self, segments: list[str], query: dict[str, list[str]], send_body: bool) -> None:
            repo = hub.repos.get(f"{segments[0]}/{segments[1]}")
            if repo is None:
                self._send_error(404, "RepoNotFound", "Repository not found", send_body)
                return
            match segments[2:]:
                case []:
                    self._send_model_info(repo, "main", send_body)
                case ["revision", revision]:
                    self._send_model_info(repo, revision, send_body)
                case ["tree", revision]:
                    if query.get("recursive") != ["true"]:
                        self._send_error(400, None, "the fake hub only lists trees recursively", send_body)
                        return
                    commit = self._commit_or_error(repo, revision, send_body)
                    if commit is not None:
                        files = repo.commits[commit]
                        self._send_json([_tree_entry(path, files[path]) for path in sorted(files)], send_body)
                case _:
                    self._send_error(404, None, f"no such endpoint: {self.path}", send_body)

        def _send_model_info(self, repo: FakeRepo, revision: str, send_body: bool) -> None:
            commit = self._commit_or_error(repo, revision, send_body)
            if commit is not None:
                info = {
                    "id": repo.repo_id,
                    "sha": commit,
                    "private": False,
                    "gated": "manual" if repo.gated_token else False,
                    "siblings": [{"rfilename": path} for path in sorted(repo.commits[commit])],
                }
                self._send_json(info, send_body)

        def _serve_file(self, repo_id: str, revision: str, path: str, send_body: bool) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._send_error(404, "RepoNotFound", "Repository not found", send_body)
                return
            if repo.gated_token and self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
                self._send_error(401, "GatedRepo", f"Access to model {repo_id} is restricted", send_body)
                return
            commit = self._commit_or_error(repo, revision, send_body)
            if commit is None:
                return
            content = repo.commits[commit].get(path)
            if content is None:
                self._send_error(404, "EntryNotFound", f"{path} does not exist", send_body, commit)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(content)))
            self.send_header("ETag", f'"{_etag(path, content)}"')
            self.send_header("X-Repo-Commit", commit)
            self.end_headers()
            if send_body:
                self.wfile.write(content)

        def _commit_or_error(self, repo: FakeRepo, revision: str, send_body: bool) -> str | None:
            commit = repo.resolve(revision)
            if commit is None:
                self._send_error(404, "RevisionNotFound", f"Invalid rev id: {revision}", send_body)
            return commit

        def _send_json(self, payload: object, send_body: bool) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _send_error(
            self,
            status: int,
            error_code: str | None,
            message: str,
            send_body: bool,
            commit: str | None = None,
        ) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Error-Message", message)
            if error_code is not None:
                self.send_header("X-Error-Code", error_code)
            if commit is not None:
                self.send_header("X-Repo-Commit", commit)
            self.end_headers()
            if send_body:
                self.wfile.write(body)

    return FakeHubHandler
