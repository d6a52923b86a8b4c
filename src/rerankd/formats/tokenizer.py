"""Loading a model folder's tokenizer into a `tokenizers.Tokenizer` whose pair encoding the engine can trust.

A wrong [CLS]/[SEP] id does not fail loudly: the model still scores, just wrongly. So every load ends
with a check that a (query, passage) pair encodes as `[CLS] query [SEP] passage [SEP]` with the
vocabulary's own ids, and every way a folder can be unusable becomes one TokenizerLoadError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer

from rerankd.formats.sentencepiece import pair_template, special_token_content, tokenizer_from_spm

TOKENIZER_JSON = "tokenizer.json"
SPM_MODEL = "spm.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
ADDED_TOKENS = "added_tokens.json"
PROBE_QUERY = "who wrote the probe?"
PROBE_PASSAGE = "The probe checks the pair layout."


class TokenizerLoadError(Exception):
    """A model folder's tokenizer is missing or unusable; the message names the folder and the problem."""

    def __init__(self, folder: Path, problem: str) -> None:
        super().__init__(f"cannot load the tokenizer in {folder}: {problem}")
        self.folder = folder
        self.problem = problem


def load_tokenizer(folder: Path, middle_separators: int = 1) -> Tokenizer:
    """The folder's tokenizer.json, else one built from its spm.model, with no padding or truncation
    (the engine sets its own) and a verified `[CLS] A [SEP] B [SEP]` pair template (`<s> A </s></s> B </s>`
    for RoBERTa's families, whose template has two separators in the middle)."""
    tokenizer_json, spm_model = folder / TOKENIZER_JSON, folder / SPM_MODEL
    config = _read_json_object(folder, TOKENIZER_CONFIG)
    if tokenizer_json.is_file():
        tokenizer = _read_tokenizer_json(folder, tokenizer_json)
    elif spm_model.is_file():
        try:
            tokenizer = tokenizer_from_spm(spm_model, config, _read_json_object(folder, ADDED_TOKENS))
        # protobuf, tokenizers and malformed configs raise many exception types; all mean an unusable folder.
        except Exception as error:
            raise TokenizerLoadError(folder, f"{SPM_MODEL} does not give a tokenizer: {error}") from error
    else:
        where = "" if folder.is_dir() else " (the folder does not exist)"
        raise TokenizerLoadError(folder, f"found neither {TOKENIZER_JSON} nor {SPM_MODEL}{where}")

    tokenizer.no_padding()
    tokenizer.no_truncation()
    try:
        cls_token = special_token_content(config, "cls_token")
        sep_token = special_token_content(config, "sep_token")
    except ValueError as error:
        raise TokenizerLoadError(folder, f"{TOKENIZER_CONFIG}: {error}") from error
    cls_id = _vocabulary_id(folder, tokenizer, cls_token)
    sep_id = _vocabulary_id(folder, tokenizer, sep_token)
    if tokenizer.post_processor is None:
        tokenizer.post_processor = pair_template(cls_token, cls_id, sep_token, sep_id)
    _verify_pair_template(folder, tokenizer, cls_id, sep_id, middle_separators)
    if tokenizer_json.is_file() and spm_model.is_file():
        _verify_special_ids_match_spm(folder, tokenizer, [cls_token, sep_token])
    return tokenizer


def load_prompt_tokenizer(folder: Path) -> Tokenizer:
    """An LLM reranker's tokenizer.json, with no padding or truncation. Its pairs are the family's prompt,
    built by the engine, so there is no pair template to verify."""
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        raise TokenizerLoadError(folder, f"found no {TOKENIZER_JSON}")
    tokenizer = _read_tokenizer_json(folder, path)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _read_json_object(folder: Path, name: str) -> dict[str, Any]:
    """An optional JSON file of the folder as a dict; absent means empty, unreadable is an error."""
    path = folder / name
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerLoadError(folder, f"{name} is not readable JSON: {error}") from error
    if not isinstance(content, dict):
        raise TokenizerLoadError(folder, f"{name} holds a {type(content).__name__}, expected a JSON object")
    return content


def _read_tokenizer_json(folder: Path, path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    # tokenizers reports every parse failure as a bare Exception.
    except Exception as error:
        raise TokenizerLoadError(folder, f"{TOKENIZER_JSON} is not a valid tokenizer: {error}") from error


def _vocabulary_id(folder: Path, tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise TokenizerLoadError(folder, f"special token {token!r} is not in the vocabulary")
    return token_id


def _verify_pair_template(
    folder: Path, tokenizer: Tokenizer, cls_id: int, sep_id: int, middle_separators: int
) -> None:
    """A cross-encoder scores the pairs it was trained on (`[CLS] query [SEP] passage [SEP]`, or with two
    separators in the middle); any other layout gives wrong scores."""
    query_ids = tokenizer.encode(PROBE_QUERY, add_special_tokens=False).ids
    passage_ids = tokenizer.encode(PROBE_PASSAGE, add_special_tokens=False).ids
    expected = [cls_id, *query_ids, *[sep_id] * middle_separators, *passage_ids, sep_id]
    actual = tokenizer.encode(PROBE_QUERY, PROBE_PASSAGE).ids
    if actual != expected:
        layout = " ".join(["[CLS] query", *["[SEP]"] * middle_separators, "passage [SEP]"])
        raise TokenizerLoadError(folder, f"a pair encodes as {actual}, expected {layout} = {expected}")


def _verify_special_ids_match_spm(folder: Path, tokenizer: Tokenizer, tokens: list[str]) -> None:
    """Catch a tokenizer.json from a faulty conversion (transformers 5.x gave DeBERTa-v3 [CLS]=5,
    [SEP]=4): a special token that is a SentencePiece piece must keep that piece's id."""
    try:
        proto = sentencepiece_model_pb2.ModelProto.FromString((folder / SPM_MODEL).read_bytes())
    except (OSError, DecodeError) as error:
        raise TokenizerLoadError(folder, f"{SPM_MODEL} is unreadable: {error}") from error
    piece_ids = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    for token in tokens:
        if token in piece_ids and tokenizer.token_to_id(token) != piece_ids[token]:
            raise TokenizerLoadError(
                folder,
                f"{TOKENIZER_JSON} gives {token!r} id {tokenizer.token_to_id(token)} "
                f"but {SPM_MODEL} has it at {piece_ids[token]}",
            )
