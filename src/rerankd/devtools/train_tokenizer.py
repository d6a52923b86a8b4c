"""Train a small DeBERTa-v3-shaped SentencePiece tokenizer folder, for machines without the real one.

Tests and benchmarks need a tokenizer of the right shape, not the real vocabulary; this trains one offline
on Python's own documentation and writes the files a DeBERTa-v3 model folder ships.
"""

from __future__ import annotations

import ast
import io
import json
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sentencepiece

from rerankd.formats.sentencepiece import SPECIAL_TOKEN_DEFAULTS, tokenizer_from_spm

# The order DeBERTa-v3 gives the pieces its trainer reserves: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3.
RESERVED_PIECE_KEYS = ("pad_token", "cls_token", "sep_token", "unk_token")


def train_unigram_tokenizer(out_dir: Path, vocab_size: int = 8000) -> None:
    """Write a small DeBERTa-v3-shaped tokenizer folder, for machines without the real one.

    Trains a SentencePiece unigram model on Python's own documentation (so no network is needed),
    in one thread so the result is the same on every run with the same Python. [PAD]=0 [CLS]=1
    [SEP]=2 [UNK]=3 as in DeBERTa-v3, [MASK]=vocab_size; writes spm.model, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json and added_tokens.json.
    """
    reserved = [SPECIAL_TOKEN_DEFAULTS[key] for key in RESERVED_PIECE_KEYS]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(training_sentences()),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=True,
        character_coverage=1.0,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece=reserved[0],
        bos_piece=reserved[1],
        eos_piece=reserved[2],
        unk_piece=reserved[3],
        num_threads=1,
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    spm_path = out_dir / "spm.model"
    spm_path.write_bytes(model.getvalue())
    mask_token = SPECIAL_TOKEN_DEFAULTS["mask_token"]
    added_tokens = {mask_token: vocab_size}
    token_ids = {content: token_id for token_id, content in enumerate(reserved)} | added_tokens
    config = _tokenizer_config(token_ids)
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", _special_tokens_map())
    _write_json(out_dir / "added_tokens.json", added_tokens)
    tokenizer_from_spm(spm_path, config, added_tokens).save(str(out_dir / "tokenizer.json"))


def training_sentences() -> list[str]:
    """Non-empty lines of the language reference bundled for pydoc and of the top-level stdlib modules'
    docstrings: English prose mixed with code, present in every CPython install."""
    # Imported here: only training needs this half-megabyte table of documentation.
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        tree = ast.parse(source.read_bytes())
        documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        texts.extend(
            docstring
            for node in ast.walk(tree)
            if isinstance(node, documented) and (docstring := ast.get_docstring(node))
        )
    return [line.strip() for text in texts for line in text.splitlines() if line.strip()]


def _added_token_json(content: str) -> dict[str, Any]:
    """One token as transformers serializes it; [UNK] is normalized, as in DeBERTa-v3's files."""
    normalized = content == SPECIAL_TOKEN_DEFAULTS["unk_token"]
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
    }


def _tokenizer_config(token_ids: Mapping[str, int]) -> dict[str, Any]:
    """tokenizer_config.json with the keys mxbai-rerank-*-v1 ship, for a tokenizer with `token_ids`."""
    return {
        "added_tokens_decoder": {
            str(token_id): _added_token_json(content) | {"special": True}
            for content, token_id in token_ids.items()
        },
        "bos_token": SPECIAL_TOKEN_DEFAULTS["cls_token"],
        "clean_up_tokenization_spaces": True,
        "cls_token": SPECIAL_TOKEN_DEFAULTS["cls_token"],
        "do_lower_case": False,
        "eos_token": SPECIAL_TOKEN_DEFAULTS["sep_token"],
        "mask_token": SPECIAL_TOKEN_DEFAULTS["mask_token"],
        "max_length": 510,
        "model_max_length": 512,
        "pad_to_multiple_of": None,
        "pad_token": SPECIAL_TOKEN_DEFAULTS["pad_token"],
        "pad_token_type_id": 0,
        "padding_side": "right",
        "sep_token": SPECIAL_TOKEN_DEFAULTS["sep_token"],
        "sp_model_kwargs": {},
        "split_by_punct": False,
        "stride": 0,
        "tokenizer_class": "DebertaV2Tokenizer",
        "truncation_side": "right",
        "truncation_strategy": "longest_first",
        "unk_token": SPECIAL_TOKEN_DEFAULTS["unk_token"],
        "vocab_type": "spm",
    }


def _special_tokens_map() -> dict[str, dict[str, Any]]:
    """special_tokens_map.json as DeBERTa-v3 ships it: bos is [CLS], eos is [SEP]."""
    roles = {"bos_token": "cls_token", "eos_token": "sep_token"}
    keys = ("bos_token", "cls_token", "eos_token", "mask_token", "pad_token", "sep_token", "unk_token")
    return {key: _added_token_json(SPECIAL_TOKEN_DEFAULTS[roles.get(key, key)]) for key in keys}


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
