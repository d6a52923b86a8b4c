"""Hostile input through a real uvicorn: no 5xx, no answer outside the served schema, the server stays up.

schemathesis fuzzes every operation of the schema (its examples, its coverage cases, random valid and invalid
requests) and checks each answer against it. hypothesis builds the bodies no client library sends: wrong
types, control characters, lone surrogates, invalid UTF-8, malformed JSON, deep nesting, 10 MB strings and
huge lists. Those invalid by construction must get a 4xx whose body, in the route's error shape (README,
"Errors"), carries a message naming the field, with no traceback or server path in it.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import checks

import rerankd
from rerankd.api.app import create_app
from rerankd.engine.models import ServedModels
from rerankd.settings import ServeSettings

from serving import running_server

pytestmark = [pytest.mark.slow, pytest.mark.network]  # real server processes on loopback

# The schema's examples name the base model: serving the random xsmall model under that name lets them score.
SERVED_NAME = "mixedbread-ai/mxbai-rerank-base-v1"
API_KEY = "hostile-input-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT = 120
MAX_DOCUMENTS = 1000  # the server's defaults (README, Configuration)
MAX_DOCUMENT_CHARS = 100_000
MAX_REQUEST_BYTES = 16 * 1024 * 1024
# What no error body may carry: a traceback, a source location, an installed or a source path.
LEAK = re.compile(
    rf"Traceback|File \"[^\"]*\", line \d+|site-packages|{re.escape(str(Path(rerankd.__file__).parent))}"
)


@pytest.fixture(scope="module")
def server(xsmall_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Keys on, /metrics included, so every security requirement the schema declares is enforced."""
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    args = ["--model", str(xsmall_model_dir), "--served-model-name", SERVED_NAME]
    with running_server([*args, "--api-key", API_KEY, "--metrics-auth"], log) as base_url:
        yield base_url


# ----------------------------------------------------------------------------------------------------------
# schemathesis against the served schema


def _served_openapi() -> dict[str, Any]:
    """The server's OpenAPI document, built without a model so schemathesis can parametrize at collection
    (`schemathesis.pytest.from_fixture` fails on pytest 9.2); the live one is checked equal to it."""
    models = ServedModels.pending([(SERVED_NAME, "never loaded")])
    return create_app(models, ServeSettings(api_key=[API_KEY], metrics_auth=True)).openapi()


OPENAPI = _served_openapi()
SCHEMA = schemathesis.openapi.from_dict(
    OPENAPI,
    config=schemathesis.Config.from_dict(
        {
            "seed": 20240611,
            "auth": {"openapi": {"HTTPBearer": {"bearer": API_KEY}}},
            # Every request carries the key; refused keys are tested on their own below.
            "generation": {"with-security-parameters": False},
        }
    ),
)
SCHEMA_CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
    checks.ignored_auth,
]
# No shrinking: every example is a round trip to the server; a failure reports the body as first generated.
HOSTILE = settings(
    phases=[Phase.explicit, Phase.generate],
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def test_live_schema_is_the_one_fuzzed(server: str) -> None:
    assert httpx.get(f"{server}/openapi.json", timeout=TIMEOUT).json() == OPENAPI


@SCHEMA.parametrize()
@settings(HOSTILE, max_examples=25)
def test_schemathesis_finds_no_server_error_or_schema_violation(case: schemathesis.Case, server: str) -> None:
    case.call_and_validate(base_url=server, checks=SCHEMA_CHECKS, timeout=TIMEOUT)


SECURED = [
    (method, path)
    for path, operations in OPENAPI["paths"].items()
    for method, operation in operations.items()
    if operation.get("security")
]


@pytest.mark.parametrize(("method", "path"), SECURED, ids=[f"{m.upper()} {p}" for m, p in SECURED])
def test_refused_key_gets_a_documented_401(server: str, method: str, path: str) -> None:
    """Found by schemathesis (status_code_conformance) when it leaves the key out: the schema declares the
    security requirement but not the answer to a missing or wrong key."""
    headers = {"Authorization": "Bearer not-the-key"}
    body = {} if method == "post" else None
    response = httpx.request(method, f"{server}{path}", headers=headers, json=body, timeout=TIMEOUT)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert_message(path, response, names="API key")
    assert "401" in OPENAPI["paths"][path][method]["responses"], (
        f"{method.upper()} {path} does not document 401"
    )


@pytest.mark.parametrize("path", list(OPENAPI["paths"]))
def test_undeclared_method_gets_405_with_allow(server: str, path: str) -> None:
    """Found by schemathesis (unsupported_method): RFC 9110 requires a 405 to name the allowed methods."""
    declared = {method.upper() for method in OPENAPI["paths"][path]}
    response = httpx.request("DELETE", f"{server}{path}", headers=AUTH, timeout=TIMEOUT)
    assert response.status_code == 405, response.text
    assert not LEAK.search(response.text)
    assert declared <= {method.strip() for method in response.headers.get("allow", "").split(",")}, (
        f"DELETE {path}: 405 without an Allow header naming {sorted(declared)}: {dict(response.headers)}"
    )


# ----------------------------------------------------------------------------------------------------------
# hypothesis-built bodies, posted raw

Kind = Literal["text", "name", "texts", "objects", "names", "count", "offset", "flag", "choice"]
CHOICES = {
    "long_documents": frozenset({"truncate", "chunk"}),
    "truncation_direction": frozenset({"right", "left"}),
}


@dataclass(frozen=True)
class Dialect:
    """One request dialect: its route, the field holding its documents, and the kind of every field."""

    route: str
    documents: str
    fields: dict[str, Kind]
    required: dict[str, Any] = field(default_factory=dict)  # fields a valid body needs besides these two
    echo: str | None = None  # the flag returning object documents as sent

    def body(self, query: Any, documents: Any, /, **extra: Any) -> dict[str, Any]:
        """A body with this query and documents; `extra` adds fields or replaces any of them."""
        return {**self.required, "query": query, self.documents: documents, **extra}


DIALECTS = {
    "rerankd": Dialect(
        "/rerank",
        "documents",
        {
            "query": "text",
            "documents": "texts",
            "model": "name",
            "top_n": "count",
            "return_documents": "flag",
            "raw_scores": "flag",
            "long_documents": "choice",
            "max_chunks_per_doc": "count",
            "chunk_overlap": "offset",
        },
    ),
    "tei": Dialect(
        "/rerank",
        "texts",
        {
            "query": "text",
            "texts": "texts",
            "model": "name",
            "return_text": "flag",
            "raw_scores": "flag",
            "truncate": "flag",
            "truncation_direction": "choice",
        },
    ),
    "cohere-v1": Dialect(
        "/v1/rerank",
        "documents",
        {
            "query": "text",
            "documents": "objects",
            "model": "name",
            "top_n": "count",
            "return_documents": "flag",
            "rank_fields": "names",
            "max_chunks_per_doc": "count",
            "raw_scores": "flag",
        },
        echo="return_documents",
    ),
    "cohere-v2": Dialect(
        "/v2/rerank",
        "documents",
        {
            "query": "text",
            "documents": "texts",
            "model": "name",
            "top_n": "count",
            "max_tokens_per_doc": "count",
        },
        required={"model": SERVED_NAME},
    ),
    "mixedbread": Dialect(
        "/v1/reranking",
        "input",
        {
            "query": "text",
            "input": "objects",
            "model": "name",
            "rank_fields": "names",
            "top_k": "count",
            "return_input": "flag",
            "rewrite_query": "flag",
        },
        echo="return_input",
    ),
    "antfly": Dialect("/ai/v1/rerank", "documents", {"query": "text", "documents": "texts", "model": "name"}),
}
OBJECT_DIALECTS = [name for name, dialect in DIALECTS.items() if dialect.echo]
DIALECT_MESSAGE_KEYS = {"/v2/rerank": "message", "/v1/reranking": "detail", "/ai/v1/rerank": "error"}


def error_message(route: str, body: Any) -> str:
    """The message of an error body, read where the route's clients read it (README, "Errors"); the routes
    outside the rerank dialects answer rerankd's own shape."""
    assert isinstance(body, dict), body
    if route == "/v1/rerank":
        assert body["detail"] == body["message"], body  # Jina reads detail, Cohere message
        return body["message"]
    if route in DIALECT_MESSAGE_KEYS:
        return body[DIALECT_MESSAGE_KEYS[route]]
    if isinstance(body["error"], str):  # TEI's shape, on /rerank
        assert body["error_type"] in {"Validation", "Overloaded", "Backend"}, body
        return body["error"]
    return body["error"]["message"]


def assert_message(route: str, response: httpx.Response, names: str | None = None) -> None:
    """A JSON error in the route's shape whose message (naming `names` when given) leaks nothing."""
    assert response.headers["content-type"].startswith("application/json"), response.text[:500]
    message = error_message(route, response.json())
    assert isinstance(message, str) and message.strip(), response.text[:500]
    assert not LEAK.search(response.text), response.text[:2000]
    if names is not None:
        assert names in message, f"{message[:500]!r} does not name {names!r}"


def assert_refused(
    route: str, response: httpx.Response, statuses: set[int] | None = None, names: str | None = None
) -> None:
    expected = statuses or set(range(400, 500))
    assert response.status_code in expected, f"{response.status_code} {response.text[:1000]}"
    assert_message(route, response, names)


def post(server: str, route: str, content: bytes) -> httpx.Response:
    headers = {**AUTH, "Content-Type": "application/json"}
    return httpx.post(f"{server}{route}", content=content, headers=headers, timeout=TIMEOUT)


def encode(body: Any) -> bytes:
    """JSON as a careless client sends it: NaN and Infinity allowed, lone surrogates escaped as \\udXXX."""
    return json.dumps(body).encode()


def accepts(kind: Kind, name: str, value: Any) -> bool:
    """Whether the schema takes `value` for the field `name` of this kind."""
    match kind:
        case "text":
            return isinstance(value, str) and has_visible_character(value)
        case "name":
            return isinstance(value, str)
        case "texts" | "names":
            return isinstance(value, list) and bool(value) and all(isinstance(item, str) for item in value)
        case "objects":
            return isinstance(value, list) and bool(value) and all(isinstance(v, str | dict) for v in value)
        case "count" | "offset":
            return type(value) is int and value >= (1 if kind == "count" else 0)
        case "flag":
            return isinstance(value, bool)
        case _:
            return isinstance(value, str) and value.lower() in CHOICES[name]


# Control and format characters (NUL, C0, DEL, C1, zero-width, bidi override, BOM, noncharacters) made common.
CONTROL = "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0)])) + "\u200b\u200e\u202e\u2028\ufeff\ufffe\uffff"
# Characters str.strip() removes.
WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u3000"
# What shows nothing: whitespace, controls (Cc), format characters (Cf: zero-width spaces and joiners, BOM,
# bidi marks) and unassigned code points (Cn, noncharacters included). A query of only these is blank.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cn"})


def has_visible_character(text: str) -> bool:
    return any(not char.isspace() and unicodedata.category(char) not in INVISIBLE_CATEGORIES for char in text)


hostile_text = st.text(st.sampled_from(CONTROL) | st.characters(codec="utf-8"), max_size=24)
huge_integers = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**100, -(10**4000)])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | huge_integers | st.floats() | hostile_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=8,
)
queries = hostile_text.filter(has_visible_character)
documents = st.lists(hostile_text, min_size=1, max_size=3)


@pytest.mark.parametrize("name", list(DIALECTS))
@settings(HOSTILE, max_examples=30)
@given(data=st.data())
def test_wrong_types_get_422_naming_the_field(server: str, name: str, data: st.DataObject) -> None:
    dialect = DIALECTS[name]
    target = data.draw(st.sampled_from(sorted(dialect.fields)), label="field")
    kind = dialect.fields[target]
    wrong = json_values | st.text(st.sampled_from(WHITESPACE + CONTROL), max_size=4)
    value = data.draw(wrong.filter(lambda v: v is not None and not accepts(kind, target, v)), label="value")
    body = dialect.body("Who wrote it?", ["Harper Lee.", "Herman Melville."], **{target: value})
    assert_refused(dialect.route, post(server, dialect.route, encode(body)), {422}, names=target)


@pytest.mark.parametrize("route", sorted({dialect.route for dialect in DIALECTS.values()}))
@settings(HOSTILE, max_examples=15)
@given(body=json_values.filter(lambda value: not isinstance(value, dict)))
def test_a_body_that_is_no_object_gets_422(server: str, route: str, body: Any) -> None:
    assert_refused(route, post(server, route, encode(body)), {422}, names="body")


@pytest.mark.parametrize("name", list(DIALECTS))
@settings(HOSTILE, max_examples=10)
@given(query=hostile_text, texts=documents)
def test_control_characters_are_text(server: str, name: str, query: str, texts: list[str]) -> None:
    """NUL and control characters in an otherwise valid request are text to score, not an error; only a
    query with no visible character is refused (as blank)."""
    dialect = DIALECTS[name]
    content = json.dumps(dialect.body(query, texts), ensure_ascii=False).encode()
    response = post(server, dialect.route, content)
    if has_visible_character(query):
        assert response.status_code == 200, f"{response.status_code} {response.text[:1000]}"
    else:
        assert_refused(dialect.route, response, {422}, names="query")


def string_paths(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Where the strings of a JSON value are (dict keys excluded)."""
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from string_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from string_paths(item, (*path, index))


def with_insert(body: Any, path: tuple[str | int, ...], insert: str, at: int) -> Any:
    """`body` with `insert` put into the string at `path`, at position `at` (clipped)."""
    if not path:
        return body[:at] + insert + body[at:]
    copy = dict(body) if isinstance(body, dict) else list(body)
    copy[path[0]] = with_insert(body[path[0]], path[1:], insert, at)
    return copy


def plain_bodies(dialect: Dialect) -> st.SearchStrategy[dict[str, Any]]:
    """Valid bodies with string documents."""
    return st.builds(dialect.body, queries, documents)


def valid_bodies(dialect: Dialect) -> st.SearchStrategy[dict[str, Any]]:
    """Valid bodies; in the object dialects, also with object documents echoed back as sent."""
    if dialect.echo is None:
        return plain_bodies(dialect)
    objects = st.fixed_dictionaries({"text": hostile_text, "note": hostile_text})
    mixed = st.lists(hostile_text | objects, min_size=1, max_size=3)
    echoing = st.builds(lambda q, d: dialect.body(q, d, **{dialect.echo: True}), queries, mixed)
    return plain_bodies(dialect) | echoing


@pytest.mark.parametrize("name", list(DIALECTS))
@settings(HOSTILE, max_examples=20)
@given(data=st.data())
def test_lone_surrogates_get_4xx(server: str, name: str, data: st.DataObject) -> None:
    """JSON can escape a lone UTF-16 surrogate (\\ud800), which is no Unicode character: no text to score,
    no model name."""
    dialect = DIALECTS[name]
    body = data.draw(plain_bodies(dialect), label="body")
    path = data.draw(st.sampled_from(list(string_paths(body))), label="path")
    surrogate = data.draw(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), label="surrogate")
    hostile = with_insert(body, path, surrogate, data.draw(st.integers(0, 24), label="at"))
    assert_refused(dialect.route, post(server, dialect.route, encode(hostile)))


INVALID_UTF8 = [
    b"\xff",  # never in UTF-8
    b"\x80",  # a continuation byte alone
    b"\xc0\xaf",  # overlong "/"
    b"\xe2\x82",  # a truncated sequence
    b"\xed\xa0\x80",  # a surrogate, encoded
    b"\xf4\x90\x80\x80",  # past U+10FFFF
]
MARK = "\x01invalid-utf-8\x01"


@pytest.mark.parametrize("name", list(DIALECTS))
@settings(HOSTILE, max_examples=15)
@given(data=st.data())
def test_invalid_utf8_gets_a_4xx(server: str, name: str, data: st.DataObject) -> None:
    """400 for bytes JSON cannot decode. UTF-8-encoded surrogates (`\\xed\\xa0\\x80`) become lone surrogates
    in Python's JSON parser: a text holding one gets 422 naming it, a model name holding one 404."""
    dialect = DIALECTS[name]
    body = data.draw(valid_bodies(dialect), label="body")
    path = data.draw(st.sampled_from(list(string_paths(body))), label="path")
    marked = json.dumps(with_insert(body, path, MARK, data.draw(st.integers(0, 24), label="at")))
    invalid = data.draw(st.sampled_from(INVALID_UTF8), label="invalid")
    content = marked.encode().replace(json.dumps(MARK)[1:-1].encode(), invalid)
    assert_refused(dialect.route, post(server, dialect.route, content), {400, 404, 422})


@pytest.mark.parametrize("name", list(DIALECTS))
@settings(HOSTILE, max_examples=15)
@given(data=st.data())
def test_malformed_json_gets_400(server: str, name: str, data: st.DataObject) -> None:
    dialect = DIALECTS[name]
    content = json.dumps(data.draw(valid_bodies(dialect), label="body"), ensure_ascii=False).encode()
    cut = data.draw(st.integers(1, len(content) - 1), label="cut")
    garbage = data.draw(st.sampled_from([b"", b",", b"]", b"'x'", b"\x00", b"{}", b"// x"]), label="garbage")
    assert_refused(dialect.route, post(server, dialect.route, content[:cut] + garbage), {400})


def nested(depth: int, shape: str) -> str:
    if shape == "arrays":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "0" + "}" * depth


@pytest.mark.parametrize("name", list(DIALECTS))
@settings(HOSTILE, max_examples=15)
@given(
    depth=st.integers(1, 2_000) | st.sampled_from([10_000, 100_000]),
    shape=st.sampled_from(["arrays", "objects"]),
    where=st.sampled_from(["body", "query", "document"]),
)
def test_deep_nesting_gets_4xx(server: str, name: str, depth: int, shape: str, where: str) -> None:
    """Nesting at the top, as the query or as a document (an object without a rank field): never valid."""
    dialect = DIALECTS[name]
    value = nested(depth, shape)
    if where == "body":
        content = value
    elif where == "query":
        content = json.dumps(dialect.body("", ["a"])).replace('""', value, 1)
    else:
        content = json.dumps(dialect.body("q", ["a", ""])).replace('""', value, 1)
    assert_refused(dialect.route, post(server, dialect.route, content.encode()), {400, 422})


@pytest.mark.parametrize("name", list(DIALECTS))
@settings(HOSTILE, max_examples=10)
@given(
    where=st.sampled_from(["query", "document", "documents", "model", "count", "padding"]),
    size=st.sampled_from([MAX_DOCUMENT_CHARS + 1, 1_000_000, 10_000_000]),
    char=st.sampled_from(["x", "\x00", "é", "\U0001f600"]),
)
def test_oversized_input_gets_4xx_naming_it(server: str, name: str, where: str, size: int, char: str) -> None:
    """Strings of up to 10 MB where a query, a document, a model name or a count goes, document lists past
    --max-documents, and bodies past --max-request-bytes (refused before they are read)."""
    dialect = DIALECTS[name]
    huge = char * size
    match where:
        case "query":  # a query of NULs is blank, which the schema refuses before any size limit applies
            status = 413 if has_visible_character(char) else 422
            body, statuses, names = dialect.body(huge, ["a"]), {status}, "query"
        case "document":
            body, statuses, names = dialect.body("q", ["a", huge]), {413}, f"{dialect.documents}.1"
        case "documents":
            many = [char] * (MAX_DOCUMENTS + size // 1000)
            body, statuses, names = dialect.body("q", many), {413}, dialect.documents
        case "model":
            body, statuses, names = dialect.body("q", ["a"], model=huge), {404}, "model"
        case "count":  # where an integer goes (a flag, or the document list, in a dialect without one)
            order = ("count", "flag", "texts")
            target = next(key for wanted in order for key, kind in dialect.fields.items() if kind == wanted)
            body, statuses, names = dialect.body("q", ["a"], **{target: huge}), {422}, target
        case _:
            padding = char * MAX_REQUEST_BYTES
            body, statuses, names = dialect.body("q", ["a"], padding=padding), {413}, "body"
    content = json.dumps(body, ensure_ascii=False).encode()
    if len(content) > MAX_REQUEST_BYTES:
        statuses, names = {413}, "body"
    assert_refused(dialect.route, post(server, dialect.route, content), statuses, names)


@pytest.mark.parametrize(("key", "tei_shape"), [("texts", True), ("documents", False)])
def test_a_body_past_the_limit_is_refused_in_the_shape_of_its_dialect(
    server: str, key: str, tei_shape: bool
) -> None:
    """`/rerank` tells TEI's requests from rerankd's own by their `texts`: a body too large to read whole is
    told apart by the start that was read, so a TEI client gets TEI's `{error, error_type}` for it too."""
    body = {"query": "q", key: ["x" * 1000] * (MAX_REQUEST_BYTES // 1000 + 1)}
    response = post(server, "/rerank", encode(body))
    assert response.status_code == 413
    error = response.json()
    if tei_shape:
        assert error["error_type"] == "Validation" and "--max-request-bytes" in error["error"]
    else:
        assert error["error"]["type"] == "request_too_large" and error["error"]["param"] == "body"


ECHOED_FIELDS = {
    **{
        f"nested {depth}": {"meta": json.loads(nested(depth, "arrays"))} for depth in (10, 200, 255, 256, 500)
    },
    "lone surrogate value": {"meta": "\udfff"},
    "lone surrogate key": {"\ud800": 1},
}


@pytest.mark.parametrize("name", OBJECT_DIALECTS)
@pytest.mark.parametrize("fields", list(ECHOED_FIELDS.values()), ids=list(ECHOED_FIELDS))
def test_echoed_object_documents_come_back_as_sent(server: str, name: str, fields: dict[str, Any]) -> None:
    """Fields an object document carries besides its rank field are only echoed back, as sent: whatever
    they hold, the answer is the document unchanged (200) or a 4xx, never a failure to serialize it."""
    dialect = DIALECTS[name]
    document = {"text": "Harper Lee.", **fields}
    response = post(server, dialect.route, encode(dialect.body("q", [document], **{dialect.echo: True})))
    if response.status_code == 200:
        results = response.json()["results" if name == "cohere-v1" else "data"]
        assert results[0]["document" if name == "cohere-v1" else "input"] == document
    else:
        assert_refused(dialect.route, response)


def test_server_is_still_up(server: str) -> None:
    assert httpx.get(f"{server}/health", timeout=TIMEOUT).status_code == 200
    dialect = DIALECTS["rerankd"]
    response = post(server, dialect.route, encode(dialect.body("Who wrote it?", ["Harper Lee.", "Melville"])))
    assert response.status_code == 200, response.text
