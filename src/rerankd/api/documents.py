"""Documents as clients send them: plain strings, or objects whose `rank_fields` make the scored text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rerankd.api.errors import APIError, ErrorType

DEFAULT_RANK_FIELDS = ("text",)
MAX_OBJECT_DEPTH = 32  # objects are echoed back; deeper ones are refused rather than failing to serialize


def is_valid_text(text: str) -> bool:
    """False for strings holding lone surrogates (JSON allows `\\ud800`; UTF-8 and the tokenizer do not)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_object(value: Any, where: str, depth: int = 0) -> None:
    """Refuse what could not be scored or echoed back: lone surrogates anywhere, or nesting past the limit."""
    if depth > MAX_OBJECT_DEPTH:
        raise APIError(
            422, f"{where}: nested deeper than {MAX_OBJECT_DEPTH} levels", ErrorType.INVALID_REQUEST, where
        )
    if isinstance(value, str) and not is_valid_text(value):
        raise APIError(
            422, f"{where}: contains a lone surrogate (invalid Unicode)", ErrorType.INVALID_REQUEST, where
        )
    if isinstance(value, dict):
        for key, item in value.items():
            _check_object(key, where, depth + 1)
            _check_object(item, where, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_object(item, where, depth + 1)


def _json_type(value: Any) -> str:
    """The JSON name of a value's type: the message says what was sent without echoing a whole object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "an object" if isinstance(value, dict) else "a list"


def _field_text(document: dict[str, Any], field: str, where: str) -> str:
    """A rank field's value, which must be a string: scoring `null`, `5` or `false` as the texts "null", "5"
    or "false" would rank a document on text its sender never wrote."""
    value = document[field]
    if not isinstance(value, str):
        param = f"{where}.{field}"
        message = f"{param}: must be a string, not {_json_type(value)}"
        raise APIError(422, message, ErrorType.INVALID_REQUEST, param)
    return value


def document_text(document: str | dict[str, Any], rank_fields: Sequence[str], where: str) -> str:
    """The text scored for one document. A string is itself. An object with one rank field is that field's
    value (so `{"text": x}` scores exactly like `x`); with several, `field: value` lines in the order given,
    skipping fields the object lacks. An object with none of the fields, or with a rank field that is no
    string, is refused, naming it (`where`)."""
    if isinstance(document, str):
        return document
    _check_object(document, where)
    present = [field for field in rank_fields if field in document]
    if not present:
        raise APIError(
            422,
            f"{where}: has none of the rank fields {list(rank_fields)} (its fields: {sorted(document)[:10]})",
            ErrorType.INVALID_REQUEST,
            where,
        )
    if len(rank_fields) == 1:
        return _field_text(document, present[0], where)
    return "\n".join(f"{field}: {_field_text(document, field, where)}" for field in present)


def document_texts(
    documents: Sequence[str | dict[str, Any]], rank_fields: Sequence[str] | None, field: str
) -> list[str]:
    """Texts of every document of the request's `field` (documents, input, …)."""
    fields = tuple(rank_fields) if rank_fields else DEFAULT_RANK_FIELDS
    return [document_text(document, fields, f"{field}.{index}") for index, document in enumerate(documents)]
