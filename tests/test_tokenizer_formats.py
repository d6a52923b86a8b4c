"""Tokenizer building and loading: ids must be exactly those of DeBERTa-v3's reference tokenizer.json,
since one wrong id changes every score without any error."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import sentencepiece
from tokenizers import Encoding, Tokenizer

from rerankd.devtools.train_tokenizer import train_unigram_tokenizer
from rerankd.formats.sentencepiece import tokenizer_from_spm
from rerankd.formats.tokenizer import TokenizerLoadError, load_tokenizer

GROUND_TRUTH_PAIR = ("Who wrote To Kill a Mockingbird?", "To Kill a Mockingbird is a novel by Harper Lee.")
GROUND_TRUTH_IDS = [
    *(1, 1876, 1597, 502, 11815, 266, 64338, 302, 2),  # [CLS] query [SEP]
    *(502, 11815, 266, 64338, 269, 266, 2626, 293, 10760, 2967, 260, 2),  # passage [SEP]
]
DEBERTA_SPECIAL_IDS = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "[MASK]": 128000}
TRAINED_VOCAB_SIZE = 8000
ODD_INPUTS = [
    "",
    " ",
    "  \t\n  ",
    "``quoted'' text and \"straight\" quotes",
    "“curly” ‘quotes’ — and dashes – here",
    "Café naïve résumé Ångström Øresund",
    "東京は日本の首都です。北京大学",
    "한국어 텍스트 and Ελληνικά, русский, العربية, हिन्दी",
    "emoji 🎉🔥 thumbs 👍🏽 family 👨‍👩‍👧",
    "control\x00chars\x07 and \x1b[0m escapes\x7f",
    "zero\u200bwidth\u00a0no-break\u3000ideographic space",
    "ﬁ ligature, Ⅻ numeral, ① circled, ｆｕｌｌｗｉｄｔｈ",
    "tabs\tand\r\nnewlines\n\nparagraphs",
    "  multiple     spaces   inside  ",
    "literal [CLS] and [SEP] and [MASK] and [UNK] tokens",
    "<0x41> looks like a byte piece",
    "mojibake â€™ and â€œ from bad decoding",
]


def _mismatches(
    reference: list[Encoding], candidate: list[Encoding], inputs: list[Any]
) -> list[tuple[Any, list[int], list[int]]]:
    """Inputs whose ids or type ids differ, with both id lists, for a readable failure."""
    return [
        (text, expected.ids, actual.ids)
        for text, expected, actual in zip(inputs, reference, candidate, strict=True)
        if (expected.ids, expected.type_ids) != (actual.ids, actual.type_ids)
    ]


def _read_jsonl_texts(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines if line.strip()]


@pytest.fixture(scope="module")
def reference_tokenizer(shared_tokenizer_dir: Path) -> Tokenizer:
    """The shipped tokenizer.json, read raw: the ids every other path must reproduce."""
    return Tokenizer.from_file(str(shared_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def spm_only_dir(shared_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with spm.model and tokenizer_config.json but no tokenizer.json."""
    folder = tmp_path_factory.mktemp("spm-only")
    for name in ("spm.model", "tokenizer_config.json"):
        shutil.copy(shared_tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def spm_tokenizer(spm_only_dir: Path) -> Tokenizer:
    return load_tokenizer(spm_only_dir)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    train_unigram_tokenizer(folder, vocab_size=TRAINED_VOCAB_SIZE)
    return folder


@pytest.fixture
def trained_copy(trained_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the trained folder, for tests that damage it."""
    return Path(shutil.copytree(trained_dir, tmp_path / "model"))


def _special_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    return {token: tokenizer.token_to_id(token) for token in DEBERTA_SPECIAL_IDS}


def test_ground_truth_pair_from_tokenizer_json(shared_tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(shared_tokenizer_dir)
    assert tokenizer.encode(*GROUND_TRUTH_PAIR).ids == GROUND_TRUTH_IDS
    assert _special_ids(tokenizer) == DEBERTA_SPECIAL_IDS


def test_ground_truth_pair_from_spm_model_folder(spm_tokenizer: Tokenizer) -> None:
    assert spm_tokenizer.encode(*GROUND_TRUTH_PAIR).ids == GROUND_TRUTH_IDS
    assert _special_ids(spm_tokenizer) == DEBERTA_SPECIAL_IDS


def test_ground_truth_pair_from_spm_model_alone(shared_tokenizer_dir: Path) -> None:
    tokenizer = tokenizer_from_spm(shared_tokenizer_dir / "spm.model")
    assert tokenizer.encode(*GROUND_TRUTH_PAIR).ids == GROUND_TRUTH_IDS
    assert _special_ids(tokenizer) == DEBERTA_SPECIAL_IDS
    assert tokenizer.get_vocab_size() == 128001


@pytest.mark.slow
def test_spm_build_matches_reference_on_msmarco(
    reference_tokenizer: Tokenizer, spm_tokenizer: Tokenizer, msmarco_dir: Path
) -> None:
    queries = _read_jsonl_texts(msmarco_dir / "queries.jsonl")
    passages = _read_jsonl_texts(msmarco_dir / "corpus.jsonl")
    singles = queries + passages
    pairs = [(queries[index % len(queries)], passage) for index, passage in enumerate(passages)]
    for inputs in (singles, pairs):
        expected = reference_tokenizer.encode_batch(inputs)
        actual = spm_tokenizer.encode_batch(inputs)
        assert _mismatches(expected, actual, inputs)[:3] == []


@pytest.mark.parametrize("text", ODD_INPUTS, ids=range(len(ODD_INPUTS)))
def test_spm_build_matches_reference_on_odd_inputs(
    reference_tokenizer: Tokenizer, spm_tokenizer: Tokenizer, text: str
) -> None:
    inputs: list[Any] = [text, (text, GROUND_TRUTH_PAIR[1]), (GROUND_TRUTH_PAIR[0], text), (text, text)]
    expected = reference_tokenizer.encode_batch(inputs)
    assert _mismatches(expected, spm_tokenizer.encode_batch(inputs), inputs) == []


def test_empty_and_blank_inputs_are_only_special_tokens(spm_tokenizer: Tokenizer) -> None:
    assert spm_tokenizer.encode("").ids == [1, 2]
    assert spm_tokenizer.encode("  \t\n ", "").ids == [1, 2, 2]


def test_trained_folder_has_deberta_layout(trained_dir: Path) -> None:
    assert {path.name for path in trained_dir.iterdir()} == {
        "spm.model",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
    }
    tokenizer = load_tokenizer(trained_dir)
    assert _special_ids(tokenizer) == DEBERTA_SPECIAL_IDS | {"[MASK]": TRAINED_VOCAB_SIZE}
    assert tokenizer.get_vocab_size() == TRAINED_VOCAB_SIZE + 1
    assert json.loads((trained_dir / "added_tokens.json").read_text()) == {"[MASK]": TRAINED_VOCAB_SIZE}
    config = json.loads((trained_dir / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"][str(TRAINED_VOCAB_SIZE)]["content"] == "[MASK]"

    encoding = tokenizer.encode(*GROUND_TRUTH_PAIR)
    first_sep = encoding.ids.index(2)
    assert encoding.ids[0] == 1 and encoding.ids[-1] == 2 and encoding.ids.count(2) == 2
    assert encoding.type_ids == [0] * (first_sep + 1) + [1] * (len(encoding.ids) - first_sep - 1)
    assert tokenizer.decode(encoding.ids) == " ".join(GROUND_TRUTH_PAIR)


def test_trained_tokenizer_agrees_with_sentencepiece(trained_dir: Path) -> None:
    """Our unigram build of the trained model segments text as SentencePiece itself does."""
    processor = sentencepiece.SentencePieceProcessor(model_file=str(trained_dir / "spm.model"))
    tokenizer = load_tokenizer(trained_dir)
    texts = [*GROUND_TRUTH_PAIR, "Return the number of items in a list.", "  extra   spaces  ", "Ünïcödé ﬁ"]
    assert [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)] == [
        processor.encode(text) for text in texts
    ]


@pytest.mark.slow
def test_training_is_deterministic(trained_dir: Path, tmp_path: Path) -> None:
    train_unigram_tokenizer(tmp_path, vocab_size=TRAINED_VOCAB_SIZE)
    for name in ("spm.model", "tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (trained_dir / name).read_bytes()


def test_spm_only_folder_matches_its_tokenizer_json(trained_copy: Path) -> None:
    from_json = load_tokenizer(trained_copy)
    (trained_copy / "tokenizer.json").unlink()
    from_spm = load_tokenizer(trained_copy)
    inputs: list[Any] = [*ODD_INPUTS, GROUND_TRUTH_PAIR, (ODD_INPUTS[5], ODD_INPUTS[6])]
    assert _mismatches(from_json.encode_batch(inputs), from_spm.encode_batch(inputs), inputs) == []


def _edit_tokenizer_json(folder: Path, **changes: Any) -> None:
    path = folder / "tokenizer.json"
    path.write_text(json.dumps(json.loads(path.read_text(encoding="utf-8")) | changes), encoding="utf-8")


def test_missing_post_processor_gets_the_pair_template(trained_copy: Path) -> None:
    expected = load_tokenizer(trained_copy).encode(*GROUND_TRUTH_PAIR)
    _edit_tokenizer_json(trained_copy, post_processor=None)
    actual = load_tokenizer(trained_copy).encode(*GROUND_TRUTH_PAIR)
    assert (actual.ids, actual.type_ids) == (expected.ids, expected.type_ids)


def test_padding_and_truncation_in_file_are_disabled(trained_copy: Path) -> None:
    padding = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None}
    padding |= {"pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
    truncation = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    _edit_tokenizer_json(trained_copy, padding=padding, truncation=truncation)
    tokenizer = load_tokenizer(trained_copy)
    assert tokenizer.padding is None and tokenizer.truncation is None
    assert len(tokenizer.encode(GROUND_TRUTH_PAIR[1]).ids) > 4


def test_wrong_pair_template_is_refused(trained_copy: Path) -> None:
    single_sep_template = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [1], "tokens": ["[CLS]"]}},
    }
    _edit_tokenizer_json(trained_copy, post_processor=single_sep_template)
    with pytest.raises(TokenizerLoadError, match=r"\[CLS\] query \[SEP\] passage \[SEP\]"):
        load_tokenizer(trained_copy)


def test_special_ids_disagreeing_with_spm_are_refused(trained_copy: Path) -> None:
    """The transformers 5.x conversion pitfall: a self-consistent tokenizer.json with [CLS] moved off
    its SentencePiece id, which the pair-template check alone cannot see."""
    path = trained_copy / "tokenizer.json"
    content = json.loads(path.read_text(encoding="utf-8"))
    vocabulary = content["model"]["vocab"]
    vocabulary[1], vocabulary[5] = vocabulary[5], vocabulary[1]
    for token in content["added_tokens"]:
        if token["content"] == "[CLS]":
            token["id"] = 5
    content["post_processor"]["special_tokens"]["[CLS]"]["ids"] = [5]
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match=re.escape("'[CLS]' id 5 but spm.model has it at 1")):
        load_tokenizer(trained_copy)


def test_folder_without_tokenizer_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError) as raised:
        load_tokenizer(tmp_path)
    message = str(raised.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "spm.model" in message


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")


@pytest.mark.parametrize("content", ["{ not json", '{"version": "1.0"}', "[]", ""])
def test_corrupt_tokenizer_json_is_refused(trained_copy: Path, content: str) -> None:
    (trained_copy / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match=re.escape("tokenizer.json")):
        load_tokenizer(trained_copy)


def test_corrupt_spm_model_is_refused(trained_copy: Path) -> None:
    (trained_copy / "tokenizer.json").unlink()
    (trained_copy / "spm.model").write_bytes(b"\x00not a sentencepiece model\xff" * 10)
    with pytest.raises(TokenizerLoadError, match=re.escape("spm.model")):
        load_tokenizer(trained_copy)


def test_corrupt_tokenizer_config_is_refused(trained_copy: Path) -> None:
    (trained_copy / "tokenizer_config.json").write_text("{ truncated", encoding="utf-8")
    with pytest.raises(TokenizerLoadError, match=re.escape("tokenizer_config.json")):
        load_tokenizer(trained_copy)
