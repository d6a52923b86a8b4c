"""Validation gaps and API-key handling (issue 38): what a careless or hostile client or operator sends that
used to slip through.

Keys: an empty key, or one with whitespace at either end, is refused at start, naming the setting and never
echoing the value; keys are compared as bytes, so a non-ASCII key matches a client that sends it UTF-8
encoded. Bodies: an object document's rank field must be a string, a query needs a visible character (not
only zero-width or bidi marks), and a TEI body cannot carry `documents` beside its `texts`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving import running_server

pytestmark = [pytest.mark.hostile]

SERVED_NAME = "xsmall"
NON_ASCII_KEY = "clé-secrète-ключ-鍵"
ASCII_KEY = "plain-ascii-key"
TIMEOUT = 120
# A refused start must end long before this; a server that started anyway is caught by it.
REFUSAL_SECONDS = 60
SECRET = "do-not-print-this-secret"


# ----------------------------------------------------------------------------------------------------------
# keys refused at start, never echoed


def serve(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`rerankd serve` as an operator runs it; settings are checked before any model loads."""
    command = [sys.executable, "-m", "rerankd", "serve", "--port", "0", "--model", "/no/such/model", *args]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=REFUSAL_SECONDS,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )


def assert_refused_at_start(result: subprocess.CompletedProcess[str], reason: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("rerankd serve: invalid settings: "), result.stderr
    assert f"api_key: {reason}" in result.stderr, result.stderr
    assert SECRET not in result.stderr and SECRET not in result.stdout, result.stderr


def keys_from(source: str, value: str, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """The flags and environment that set `api_key` to `value` from `source` (a flag, a variable, a file)."""
    if source == "flag":
        return [f"--api-key={value}"], {}
    if source == "environment":
        return [], {"RERANKD_API_KEY": value}
    config = tmp_path / "rerankd.toml"
    config.write_text(f"api_key = {value}\n", encoding="utf-8")
    return ["--config", str(config)], {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "value"),
    [
        ("flag", ""),
        ("environment", ""),
        ("environment", f"{SECRET},"),  # an empty key after the comma
        ("environment", f"{SECRET},,other"),
        ("file", '""'),
        ("file", f'["{SECRET}", ""]'),
    ],
)
def test_an_empty_key_is_refused_at_start(tmp_path: Path, source: str, value: str) -> None:
    """An empty key matched a request without an Authorization header: the server was open."""
    args, env = keys_from(source, value, tmp_path)
    assert_refused_at_start(serve(args, env), "an API key is empty")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "value"),
    [
        ("flag", f" {SECRET}"),
        ("flag", f"{SECRET}\t"),
        ("environment", f"{SECRET} "),
        ("environment", f"other, {SECRET}\n"),
        ("environment", f'["{SECRET} "]'),
        ("file", f'" {SECRET}"'),
        ("file", f'["other", "{SECRET}\\u00a0"]'),
    ],
)
def test_a_key_with_surrounding_whitespace_is_refused_at_start(
    tmp_path: Path, source: str, value: str
) -> None:
    """HTTP strips a header value's surrounding whitespace: such a key could never match; nor is it stripped
    silently into another key."""
    args, env = keys_from(source, value, tmp_path)
    assert_refused_at_start(serve(args, env), "an API key starts or ends with whitespace")


@pytest.mark.slow
def test_a_key_that_is_not_utf8_is_refused_at_start() -> None:
    """An environment variable's undecodable bytes reach Python as lone surrogates, which no UTF-8 client can
    send; comparing against them failed every request."""
    result = serve([], {"RERANKD_API_KEY": f"{SECRET}\udcff"})  # the byte 0xff, as os.environ holds it
    assert_refused_at_start(result, "an API key is not valid UTF-8")


@pytest.mark.slow
def test_a_malformed_key_list_is_refused_without_echoing_it() -> None:
    """pydantic's own message quotes the input (`input_value=...`): the startup error must not."""
    result = serve([], {"RERANKD_API_KEY": f'["{SECRET}"', "RERANKD_MAX_DOCUMENTS": "0"})
    assert_refused_at_start(result, "Expecting")
    assert "max_documents: " in result.stderr, result.stderr  # every setting's problem, each by name


# ----------------------------------------------------------------------------------------------------------
# a live server with keys


@pytest.fixture(scope="module")
def server(xsmall_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Two keys, one non-ASCII, from the environment (its comma-separated form)."""
    log = tmp_path_factory.mktemp("hostile-validation") / "server.log"
    args = ["--model", f"{SERVED_NAME}={xsmall_model_dir}"]
    with running_server(args, log, env={"RERANKD_API_KEY": f"{NON_ASCII_KEY},{ASCII_KEY}"}) as base_url:
        yield base_url


def bearer(key: bytes) -> dict[bytes, bytes]:
    """The header as raw bytes: httpx sends them unchanged, as a client that encodes its key itself does."""
    return {b"Authorization": b"Bearer " + key}


AUTH = bearer(ASCII_KEY.encode())

# route, the field holding the documents, the fields a valid body needs besides query and documents
DIALECTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "rerankd": ("/rerank", "documents", {}),
    "tei": ("/rerank", "texts", {}),
    "cohere-v1": ("/v1/rerank", "documents", {}),
    "cohere-v2": ("/v2/rerank", "documents", {"model": SERVED_NAME}),
    "mixedbread": ("/v1/reranking", "input", {}),
    "antfly": ("/ai/v1/rerank", "documents", {}),
}
OBJECT_DIALECTS = ["cohere-v1", "mixedbread"]


def rerank(server: str, name: str, query: Any, texts: list[Any], /, **extra: Any) -> httpx.Response:
    """POST a body in dialect `name` with this query and these documents; `extra` adds fields."""
    route, field, required = DIALECTS[name]
    body = {**required, "query": query, field: texts, **extra}
    return httpx.post(f"{server}{route}", json=body, headers=AUTH, timeout=TIMEOUT)


def error_message(name: str, response: httpx.Response) -> str:
    """The message where the dialect's clients read it (README, "Errors")."""
    body = response.json()
    match name:
        case "rerankd":
            return body["error"]["message"]
        case "tei":
            assert body["error_type"] == "Validation", body
            return body["error"]
        case "cohere-v1":
            assert body["detail"] == body["message"], body
            return body["message"]
        case "cohere-v2":
            return body["message"]
        case "mixedbread":
            return body["detail"]
        case _:
            return body["error"]


def assert_422_naming(name: str, response: httpx.Response, field: str) -> str:
    assert response.status_code == 422, response.text
    message = error_message(name, response)
    assert message.startswith(f"{field}: "), message
    return message


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("key", [NON_ASCII_KEY, ASCII_KEY])
def test_every_key_matches_sent_as_utf8(server: str, key: str) -> None:
    headers = bearer(key.encode("utf-8"))
    response = httpx.post(
        f"{server}/rerank", json={"query": "q", "documents": ["a"]}, headers=headers, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer(b"wrong-key"),
        bearer(NON_ASCII_KEY.encode("latin-1", errors="replace")),
        bearer(NON_ASCII_KEY.encode("utf-8") + b"x"),
        bearer(ASCII_KEY.encode()[:-1]),
        {b"Authorization": b"Basic " + ASCII_KEY.encode()},
    ],
    ids=["no header", "wrong key", "latin-1 bytes", "longer", "shorter", "other scheme"],
)
@pytest.mark.parametrize("route", ["/rerank", "/v1/rerank", "/models"])
def test_a_request_without_a_matching_key_gets_401(
    server: str, route: str, headers: dict[bytes, bytes]
) -> None:
    body = {"query": "q", "documents": ["a"]}
    if route == "/models":
        response = httpx.get(f"{server}{route}", headers=headers, timeout=TIMEOUT)
    else:
        response = httpx.post(f"{server}{route}", json=body, headers=headers, timeout=TIMEOUT)
    assert response.status_code == 401, response.text
    assert NON_ASCII_KEY not in response.text and ASCII_KEY not in response.text


# ----------------------------------------------------------------------------------------------------------
# object documents: a rank field is a string


NOT_STRINGS: dict[str, Any] = {
    "null": None,
    "integer": 5,
    "float": 0.5,
    "false": False,
    "true": True,
    "object": {},
    "list": [],
}


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("name", OBJECT_DIALECTS)
@pytest.mark.parametrize("value", list(NOT_STRINGS.values()), ids=list(NOT_STRINGS))
def test_a_rank_field_that_is_no_string_gets_422_naming_it(server: str, name: str, value: Any) -> None:
    """`{"text": null}` was scored as the text "null"."""
    field = DIALECTS[name][1]
    documents = ["a string", {"text": "an object"}, {"text": "another"}, {"text": value}]
    message = assert_422_naming(name, rerank(server, name, "q", documents), f"{field}.3.text")
    assert message.startswith(f"{field}.3.text: must be a string"), message


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("name", OBJECT_DIALECTS)
def test_every_rank_field_must_be_a_string(server: str, name: str) -> None:
    field = DIALECTS[name][1]
    documents = [{"title": "Mockingbird", "text": "A novel.", "year": 1960}]
    response = rerank(server, name, "q", documents, rank_fields=["title", "text", "year"])
    assert_422_naming(name, response, f"{field}.0.year")
    as_text = [{**documents[0], "year": "1960"}]
    response = rerank(server, name, "q", as_text, rank_fields=["title", "text", "year"])
    assert response.status_code == 200, response.text
    # Fields outside rank_fields are only echoed back: they may hold anything.
    response = rerank(server, name, "q", documents, rank_fields=["title", "text"])
    assert response.status_code == 200, response.text


# ----------------------------------------------------------------------------------------------------------
# a query needs a visible character


INVISIBLE_QUERIES = {
    "zero-width spaces": "\u200b\u200b",
    "byte order mark": "\ufeff",
    "left-to-right mark": "\u200e",
    "joiners and spaces": " \u200c\u200d\u2060 ",
    "controls and noncharacter": "\x00\x7f\ufffe",
}


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("name", list(DIALECTS))
@pytest.mark.parametrize("query", list(INVISIBLE_QUERIES.values()), ids=list(INVISIBLE_QUERIES))
def test_a_query_with_nothing_visible_gets_422(server: str, name: str, query: str) -> None:
    """`str.strip` let a query of zero-width spaces through, to be scored against nothing."""
    message = assert_422_naming(name, rerank(server, name, query, ["a", "b"]), "query")
    assert "blank" in message, message


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("name", list(DIALECTS))
def test_invisible_characters_around_a_visible_one_are_text(server: str, name: str) -> None:
    response = rerank(server, name, "\u200b\x00q\ufeff\u200e", ["a", "b"])
    assert response.status_code == 200, response.text


# ----------------------------------------------------------------------------------------------------------
# TEI's texts beside rerankd's documents


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("documents", [["other"], [], None])
def test_a_tei_body_with_documents_too_gets_422_naming_documents(server: str, documents: Any) -> None:
    """`documents` beside `texts` were silently dropped: the client got scores for other texts than it
    meant."""
    response = rerank(server, "tei", "q", ["a", "b"], documents=documents)
    message = assert_422_naming("tei", response, "documents")
    assert "texts" in message, message
    assert rerank(server, "tei", "q", ["a", "b"]).status_code == 200
