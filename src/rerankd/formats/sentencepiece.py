"""Fast tokenizers built from SentencePiece unigram models with the `tokenizers` library alone.

A model folder may ship only `spm.model`. transformers 5.x's slow->fast conversion of DeBERTa-v3's
`spm.model` gives [CLS]/[SEP] the wrong ids, so we build the tokenizer ourselves, the way the
Hugging Face tokenizer.json of these models is built: same pieces and scores, same normalizer,
pre-tokenizer and special-token ids, hence the same ids on every input.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

METASPACE = "▁"
SPECIAL_TOKEN_DEFAULTS: dict[str, str] = {
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "unk_token": "[UNK]",
    "mask_token": "[MASK]",
}


def special_token_content(tokenizer_config: Mapping[str, Any], key: str) -> str:
    """The text of a named special token; configs store it as a string or as a serialized AddedToken."""
    value = tokenizer_config.get(key) or SPECIAL_TOKEN_DEFAULTS[key]
    if isinstance(value, Mapping):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise ValueError(f"tokenizer config {key} is {value!r}, expected a token string")
    return value


def pair_template(cls_token: str, cls_id: int, sep_token: str, sep_id: int) -> processors.TemplateProcessing:
    """`[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]` (B typed 1): the layout DeBERTa cross-encoders expect."""
    return processors.TemplateProcessing(
        single=f"{cls_token} $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[(cls_token, cls_id), (sep_token, sep_id)],
    )


def unigram_tokenizer(
    vocabulary: list[tuple[str, float]],
    unk_id: int,
    character_steps: list[normalizers.Normalizer],
    remove_extra_whitespaces: bool = True,
    prepend_scheme: str = "always",
) -> Tokenizer:
    """A SentencePiece-style unigram tokenizer without byte fallback (unknown characters become [UNK], as in
    the reference tokenizer.json): `character_steps` normalize characters; SentencePiece's removal of extra
    whitespace becomes Strip before them and collapsing of space runs after them; ▁ marks word starts."""
    tokenizer = Tokenizer(models.Unigram(vocabulary, unk_id=unk_id, byte_fallback=False))
    steps = list(character_steps)
    if remove_extra_whitespaces:
        steps = [normalizers.Strip(left=True, right=True), *steps, normalizers.Replace(Regex(" {2,}"), " ")]
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(METASPACE, prepend_scheme=prepend_scheme, split=True)
    tokenizer.decoder = decoders.Metaspace(METASPACE, prepend_scheme=prepend_scheme, split=True)
    return tokenizer


def read_unigram_model(spm_path: Path) -> sentencepiece_model_pb2.ModelProto:
    """Parse `spm_path`, refusing what this module cannot reproduce faithfully (BPE, suffix whitespace)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_path.read_bytes())
    if not proto.pieces:
        raise ValueError(f"{spm_path} holds no SentencePiece pieces")
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise ValueError(f"{spm_path} is a {model_type} SentencePiece model; only UNIGRAM is supported")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise ValueError(f"{spm_path} treats whitespace as a suffix, which Metaspace cannot reproduce")
    return proto


def tokenizer_from_spm(
    spm_path: Path,
    tokenizer_config: Mapping[str, Any] | None = None,
    added_tokens: Mapping[str, int] | None = None,
) -> Tokenizer:
    """Build the fast tokenizer for a SentencePiece unigram model (DeBERTa-v3 layout).

    `tokenizer_config` is the folder's tokenizer_config.json (special-token names, do_lower_case,
    added_tokens_decoder), `added_tokens` its added_tokens.json. Byte fallback stays off even when
    the model has byte pieces: the reference tokenizer.json maps unknown characters to [UNK].
    """
    config: Mapping[str, Any] = tokenizer_config or {}
    if config.get("split_by_punct"):
        raise ValueError("split_by_punct=true is not supported (DeBERTa-v3 rerankers do not use it)")
    proto = read_unigram_model(spm_path)
    vocabulary = [(piece.piece, piece.score) for piece in proto.pieces]
    spec = proto.normalizer_spec
    # SentencePiece's own precompiled normalization (NFKC for DeBERTa-v3).
    character_steps: list[normalizers.Normalizer] = (
        [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    )
    tokenizer = unigram_tokenizer(
        vocabulary,
        proto.trainer_spec.unk_id,
        character_steps,
        remove_extra_whitespaces=spec.remove_extra_whitespaces,
        prepend_scheme="always" if spec.add_dummy_prefix else "never",
    )
    if config.get("do_lower_case"):
        # Lowercasing comes first, on the raw text, as in transformers' own DeBERTa-v2 conversion.
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), tokenizer.normalizer])

    token_ids = _added_token_ids(proto, config, added_tokens or {})
    tokenizer.add_special_tokens(
        [_added_token(content, config) for content in sorted(token_ids, key=token_ids.__getitem__)]
    )
    misplaced = {
        content: (token_id, tokenizer.token_to_id(content))
        for content, token_id in token_ids.items()
        if tokenizer.token_to_id(content) != token_id
    }
    if misplaced:
        raise ValueError(
            f"added tokens must follow the vocabulary without gaps; wanted (id, got) {misplaced} "
            f"for a vocabulary of {len(vocabulary)}"
        )
    cls_token = special_token_content(config, "cls_token")
    sep_token = special_token_content(config, "sep_token")
    tokenizer.post_processor = pair_template(cls_token, token_ids[cls_token], sep_token, token_ids[sep_token])
    return tokenizer


def _added_token_ids(
    proto: sentencepiece_model_pb2.ModelProto, config: Mapping[str, Any], added_tokens: Mapping[str, int]
) -> dict[str, int]:
    """Ids of the special and added tokens: a SentencePiece piece keeps its own id, any other token
    takes the id the config declares, else the next one after the vocabulary (so DeBERTa-v3's [MASK]
    gets 128000)."""
    piece_ids = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    decoder = config.get("added_tokens_decoder", {})
    declared = {entry["content"]: int(token_id) for token_id, entry in decoder.items()}
    for content, token_id in added_tokens.items():
        if declared.setdefault(content, token_id) != token_id:
            raise ValueError(
                f"{content!r} is {declared[content]} in tokenizer_config.json but {token_id} in "
                "added_tokens.json"
            )

    named = [special_token_content(config, key) for key in SPECIAL_TOKEN_DEFAULTS]
    contents = dict.fromkeys(named + list(declared))
    token_ids: dict[str, int] = {}
    for content in contents:
        piece_id, declared_id = piece_ids.get(content), declared.get(content)
        if piece_id is not None:
            if declared_id not in (None, piece_id):
                raise ValueError(f"{content!r} is SentencePiece piece {piece_id}, config says {declared_id}")
            token_ids[content] = piece_id
        elif declared_id is not None:
            if declared_id < len(proto.pieces):
                taken_by = proto.pieces[declared_id].piece
                raise ValueError(f"the config gives {content!r} id {declared_id}, already piece {taken_by!r}")
            token_ids[content] = declared_id
    next_id = max([len(proto.pieces) - 1, *token_ids.values()]) + 1
    for content in contents:
        if content not in token_ids:
            token_ids[content] = next_id
            next_id += 1
    return token_ids


def _added_token(content: str, config: Mapping[str, Any]) -> AddedToken:
    """The token with the flags of its added_tokens_decoder entry (DeBERTa-v3 marks [UNK] normalized)."""
    entries = config.get("added_tokens_decoder", {}).values()
    declared: Mapping[str, Any] = next((entry for entry in entries if entry["content"] == content), {})
    return AddedToken(
        content,
        single_word=declared.get("single_word", False),
        lstrip=declared.get("lstrip", False),
        rstrip=declared.get("rstrip", False),
        normalized=declared.get("normalized", False),
        special=declared.get("special", True),
    )
