"""GGUF files in the Antfly Inference layout: export from a safetensors folder, read back, score.

A tiny geometry (hidden 256, so every matrix splits into Q4_K blocks) with a small trained vocabulary
covers every export type quickly; the xsmall and base geometries with the real DeBERTa-v3 vocabulary
check the published layout and the tokenizer rebuilt from metadata on MS MARCO. Files are written in
folders of their own, so no sidecar config.json or tokenizer.json is picked up unless a test puts one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from rerankd.catalog import CATALOG, CatalogEntry, Geometry
from rerankd.devtools.random_model import write_random_model
from rerankd.formats import gguf_writer
from rerankd.formats.gguf_file import (
    LEADING_BYTES,
    GGUFModelError,
    _leading_architecture,
    find_gguf_variants,
    gguf_architecture,
)
from rerankd.formats.gguf_layout import parse_variant_file_name, variant_file_name
from rerankd.formats.gguf_reader import DebertaGGUF, open_deberta_gguf
from rerankd.formats.gguf_writer import GGUFExportError, export_gguf, read_vocabulary
from rerankd.formats.safetensors import SafetensorsCheckpoint
from rerankd.formats.tokenizer import load_tokenizer
from rerankd.modeling.config import DebertaConfig
from rerankd.modeling.weights import load_reranker

CPU = torch.device("cpu")
EXPORT_TYPES = ("f32", "f16", "q8_0", "q4_k")
TINY_GEOMETRY = Geometry(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
PAIRS = [
    (
        "who wrote to kill a mockingbird?",
        "To Kill a Mockingbird is a novel by Harper Lee, published in 1960.",
    ),
    ("who wrote to kill a mockingbird?", "Moby-Dick was written by Herman Melville."),
    ("boiling point of water", "At sea level, water boils at 100 degrees Celsius (212 °F)."),
    ("", "An empty query still gets a score."),
]

# The layout, spelled out here rather than imported, so the tests check the files against the spec.
LAYOUT_KEYS = [
    "general.architecture",
    "general.alignment",
    "deberta.vocab_size",
    "deberta.embedding_length",
    "deberta.block_count",
    "deberta.attention.head_count",
    "deberta.feed_forward_length",
    "deberta.context_length",
    "deberta.position_buckets",
    "deberta.label_count",
    "deberta.layer_norm_epsilon",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
]
CHARSMAP_KEY = "tokenizer.ggml.precompiled_charsmap"
CONFIG_OF_KEY = {
    "deberta.vocab_size": "vocab_size",
    "deberta.embedding_length": "hidden_size",
    "deberta.block_count": "num_hidden_layers",
    "deberta.attention.head_count": "num_attention_heads",
    "deberta.feed_forward_length": "intermediate_size",
    "deberta.context_length": "max_position_embeddings",
    "deberta.position_buckets": "position_buckets",
}
Q8_0, Q4_K = GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_K
F16, F32 = GGMLQuantizationType.F16, GGMLQuantizationType.F32


# --- helpers -------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; only "\\n" ends a line (the passages contain U+0085 and U+2028)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def encode(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    encodings = tokenizer.encode_batch(list(pairs))
    length = max(len(encoding.ids) for encoding in encodings)
    ids = torch.tensor([encoding.ids + [0] * (length - len(encoding.ids)) for encoding in encodings])
    mask = torch.tensor(
        [[1] * len(encoding.ids) + [0] * (length - len(encoding.ids)) for encoding in encodings]
    )
    return ids, mask


def safetensors_logits(folder: Path) -> torch.Tensor:
    config = DebertaConfig.from_dict(json.loads((folder / "config.json").read_text()))
    model = load_reranker(config, SafetensorsCheckpoint(folder), torch.float32, CPU)
    return model(*encode(load_tokenizer(folder), PAIRS))


def gguf_logits(model: DebertaGGUF, tokenizer: Tokenizer) -> torch.Tensor:
    network = load_reranker(DebertaConfig.from_dict(model.config), model.tensors, torch.float32, CPU)
    return network(*encode(tokenizer, PAIRS))


def export_to(src: Path, folder: Path, qtype: str, charsmap: bool = True, **options: Any) -> Path:
    """Export into `folder`; without `charsmap` the file is as Antfly writes it (and opens seconds faster:
    gguf parses the 237 kB table one element at a time)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / variant_file_name("model", qtype)
    read = gguf_writer.read_vocabulary
    with pytest.MonkeyPatch.context() as patch:
        if not charsmap:
            patch.setattr(
                gguf_writer,
                "read_vocabulary",
                lambda folder: dataclasses.replace(read(folder), precompiled_charsmap=None),
            )
        export_gguf(src, out, qtype, **options)
    return out


def source_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """GGUF name -> (torch shape, dtype) of every tensor in the folder's model.safetensors."""
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {
            name.removeprefix("deberta."): (
                tuple(handle.get_slice(name).get_shape()),
                handle.get_tensor(name).dtype,
            )
            for name in handle.keys()  # noqa: SIM118 - safe_open is not a Mapping
        }


def expected_type(name: str, shape: tuple[int, ...], source: torch.dtype, qtype: str) -> GGMLQuantizationType:
    """The §2 quantization policy, restated: quantize float matrices whose rows split into blocks,
    keep word embeddings F16 in Q8_0 by default, biases and LayerNorms keep the source dtype."""
    source_type = {torch.float16: F16, torch.float32: F32}[source]
    if qtype == "f32":
        return F32
    if len(shape) == 1:
        return source_type
    if qtype == "f16":
        return F16
    block = {"q8_0": 32, "q4_k": 256}[qtype]
    if shape[-1] % block or (qtype == "q8_0" and name == "embeddings.word_embeddings.weight"):
        return F16
    return {"q8_0": Q8_0, "q4_k": Q4_K}[qtype]


def check_layout(reader: GGUFReader, folder: Path, qtype: str, charsmap: bool) -> None:
    """Exactly the §2 keys and values, tensor names, ggml dimension order, types per policy, alignment 32."""
    config = json.loads((folder / "config.json").read_text())
    keys = [key for key in reader.fields if not key.startswith("GGUF.")]
    assert keys == [*LAYOUT_KEYS, *([CHARSMAP_KEY] if charsmap else [])]

    def value(key: str) -> Any:
        return reader.fields[key].contents()

    assert value("general.architecture") == "deberta"
    assert value("general.alignment") == 32
    for key, config_key in CONFIG_OF_KEY.items():
        assert value(key) == config[config_key], key
    assert value("deberta.label_count") == len(config["id2label"])
    assert value("deberta.layer_norm_epsilon") == pytest.approx(config["layer_norm_eps"])
    assert value("tokenizer.ggml.model") == "bert"
    assert value("tokenizer.ggml.add_bos_token") is False
    assert value("tokenizer.ggml.add_eos_token") is False
    tokens = value("tokenizer.ggml.tokens")
    added = json.loads((folder / "added_tokens.json").read_text())
    assert len(tokens) == max(added.values()) + 1
    assert tokens[:4] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]
    assert tokens[-1] == "[MASK]"
    assert len(value("tokenizer.ggml.scores")) == len(tokens)
    types = value("tokenizer.ggml.token_type")
    assert types[:4] == [3, 3, 3, 2]
    assert types[-1] == 3
    assert set(types[4:-1]) == {1}
    assert [value(f"tokenizer.ggml.{role}_token_id") for role in ("bos", "eos", "unknown", "padding")] == [
        1,
        2,
        3,
        0,
    ]

    sources = source_tensors(folder)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert set(tensors) == set(sources)
    assert reader.alignment == 32
    for name, (shape, dtype) in sources.items():
        tensor = tensors[name]
        assert tensor.shape.tolist() == list(reversed(shape)), name
        assert tensor.tensor_type == expected_type(name, shape, dtype, qtype), name
        assert tensor.data_offset % 32 == 0, name


def rewrite_gguf(
    source: Path,
    target: Path,
    *,
    architecture: str = "deberta",
    drop_keys: Sequence[str] = (),
    values: Mapping[str, tuple[Any, GGUFValueType]] | None = None,
    drop_tensors: Sequence[str] = (),
    tensors: Mapping[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
) -> Path:
    """Copy a GGUF file with some metadata or tensors changed, dropped or replaced."""
    reader = GGUFReader(source)
    writer = GGUFWriter(target, architecture)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        if values and key in values:
            writer.add_key_value(key, *values[key])
            continue
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), main_type, sub_type)
    for tensor in reader.tensors:
        if tensor.name in drop_tensors:
            continue
        data, qtype = (tensors or {}).get(tensor.name, (np.asarray(tensor.data), tensor.tensor_type))
        writer.add_tensor(tensor.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 random weights at hidden 256 with a small trained unigram vocabulary."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(CATALOG, "tiny", CatalogEntry("rerankd-random/tiny", TINY_GEOMETRY, "3M", "6 MB"))
        return write_random_model(tmp_path_factory.mktemp("tiny-model"), "tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_exports(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, DebertaGGUF]:
    """The tiny model exported to every type and opened; only the Q8_0 file carries the charsmap."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    return {
        qtype: open_deberta_gguf(export_to(tiny_model_dir, root / qtype, qtype, charsmap=qtype == "q8_0"))
        for qtype in EXPORT_TYPES
    }


@pytest.fixture(scope="module")
def tiny_reference_logits(tiny_model_dir: Path) -> torch.Tensor:
    return safetensors_logits(tiny_model_dir)


@pytest.fixture(scope="module")
def plain_tiny_gguf(tiny_exports: dict[str, DebertaGGUF]) -> Path:
    """The tiny F32 file (no charsmap, quick to open): the base of the broken files below."""
    return tiny_exports["f32"].path


@pytest.fixture(scope="module")
def xsmall_reference_logits(xsmall_model_dir: Path) -> torch.Tensor:
    return safetensors_logits(xsmall_model_dir)


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", EXPORT_TYPES)
def test_tiny_export_has_the_layout(
    tiny_exports: dict[str, DebertaGGUF], tiny_model_dir: Path, qtype: str
) -> None:
    model = tiny_exports[qtype]
    check_layout(model.reader, tiny_model_dir, qtype, charsmap=qtype == "q8_0")
    assert model.file_type == qtype.upper()
    assert sum(model.type_summary().values()) == len(model.tensor_types)


def test_tiny_round_trip_scores(
    tiny_exports: dict[str, DebertaGGUF], tiny_reference_logits: torch.Tensor
) -> None:
    tokenizer = tiny_exports["f32"].tokenizer()
    drift = {
        qtype: (gguf_logits(model, tokenizer) - tiny_reference_logits).abs().max().item()
        for qtype, model in tiny_exports.items()
    }
    assert drift["f32"] <= 1e-5
    assert drift["f16"] <= 1e-3
    assert 0 < drift["q8_0"] < drift["q4_k"] < 0.5, drift


def test_tiny_tokenizer_from_metadata_with_charsmap(
    tiny_exports: dict[str, DebertaGGUF], tiny_model_dir: Path
) -> None:
    real = load_tokenizer(tiny_model_dir)
    rebuilt = tiny_exports["q8_0"].tokenizer()
    texts = [text for pair in PAIRS for text in pair] + ["tabs\tand\u00a0odd\u200bspaces  ", "[MASK] [UNK] x"]
    assert [encoding.ids for encoding in rebuilt.encode_batch(texts)] == [
        encoding.ids for encoding in real.encode_batch(texts)
    ]
    assert [encoding.ids for encoding in rebuilt.encode_batch(PAIRS)] == [
        encoding.ids for encoding in real.encode_batch(PAIRS)
    ]


def test_keep_prefixes_and_progress(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keep = ["deberta.encoder.layer.1", "pooler"]
    out = export_to(tiny_model_dir, tmp_path, "q4_k", charsmap=False, keep=keep, progress=True)
    assert "model.Q4_K.gguf" in capsys.readouterr().err
    reader = GGUFReader(out)
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert types["encoder.layer.1.intermediate.dense.weight"] == F16
    assert types["pooler.dense.weight"] == F16
    assert types["encoder.layer.0.intermediate.dense.weight"] == Q4_K
    assert types["embeddings.word_embeddings.weight"] == Q4_K
    assert list(tmp_path.iterdir()) == [out]


def test_vocabulary_is_the_same_from_spm_model_or_tokenizer_json(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    vocabularies = []
    for dropped in ("spm.model", "tokenizer.json"):
        folder = Path(shutil.copytree(tiny_model_dir, tmp_path / dropped))
        (folder / dropped).unlink()
        vocabulary = read_vocabulary(folder)
        # tokenizer.json prints the float32 scores of spm.model as float64; GGUF stores float32.
        vocabularies.append(dataclasses.replace(vocabulary, scores=np.float32(vocabulary.scores).tolist()))
    assert vocabularies[0] == vocabularies[1]
    assert vocabularies[0].precompiled_charsmap


def test_bf16_source(tiny_model_dir: Path, tmp_path: Path) -> None:
    """bf16 checkpoints: vectors stay BF16 in the file and read back as bfloat16, matrices become F16."""
    source = Path(shutil.copytree(tiny_model_dir, tmp_path / "bf16"))
    weights = load_file(source / "model.safetensors")
    save_file(
        {name: tensor.to(torch.bfloat16) for name, tensor in weights.items()}, source / "model.safetensors"
    )
    model = open_deberta_gguf(export_to(source, tmp_path / "gguf", "f16", charsmap=False))
    assert model.type_summary() == {"BF16": 26, "F16": 16}
    assert model.tensors.read("classifier.bias").dtype == torch.bfloat16
    drift = (gguf_logits(model, model.tokenizer()) - safetensors_logits(source)).abs().max().item()
    assert drift <= 1e-3


@pytest.mark.slow
def test_xsmall_q8_0_without_charsmap_scores_and_tokenizes_msmarco(
    xsmall_model_dir: Path,
    xsmall_reference_logits: torch.Tensor,
    shared_tokenizer_dir: Path,
    msmarco_dir: Path,
    tmp_path: Path,
) -> None:
    """The published Q8_0 layout at the real vocabulary, read back with no sidecar and no charsmap
    (as Antfly's files are): same weights up to Q8_0 rounding, same ids as tokenizer.json on every
    query and every (query, passage) pair, hence every passage."""
    model = open_deberta_gguf(export_to(xsmall_model_dir, tmp_path, "q8_0", charsmap=False))
    check_layout(model.reader, xsmall_model_dir, "q8_0", charsmap=False)
    assert model.tensor_types["embeddings.word_embeddings.weight"] == "F16"

    real = Tokenizer.from_file(str(shared_tokenizer_dir / "tokenizer.json"))
    drift = (gguf_logits(model, model.tokenizer()) - xsmall_reference_logits).abs().max().item()
    assert 0 < drift < 0.01

    passages = [document["text"] for document in read_jsonl(msmarco_dir / "corpus.jsonl")]
    queries = [query["text"] for query in read_jsonl(msmarco_dir / "queries.jsonl")]
    pairs = [(queries[index % len(queries)], passage) for index, passage in enumerate(passages)]
    rebuilt = model.tokenizer()
    for batch in (queries, pairs):
        assert [encoding.ids for encoding in rebuilt.encode_batch(batch)] == [
            encoding.ids for encoding in real.encode_batch(batch)
        ]


@pytest.mark.slow
def test_base_geometry_f16_round_trip(base_model_dir: Path, tmp_path: Path) -> None:
    """At the mxbai-rerank-base geometry, with the charsmap the tokenizer is SentencePiece's own."""
    model = open_deberta_gguf(export_to(base_model_dir, tmp_path, "f16"))
    check_layout(model.reader, base_model_dir, "f16", charsmap=True)
    drift = (gguf_logits(model, model.tokenizer()) - safetensors_logits(base_model_dir)).abs().max().item()
    assert drift <= 1e-3
    real, rebuilt = load_tokenizer(base_model_dir), model.tokenizer()
    texts = [*PAIRS, ("ｶﾞ \u1100\u1161 a\u0328\u0301 ～ 🈻", "\x8fcontrol\u2581marker\u00ad")]
    assert [encoding.ids for encoding in rebuilt.encode_batch(texts)] == [
        encoding.ids for encoding in real.encode_batch(texts)
    ]


# --- sidecars and variants -----------------------------------------------------------------------


def test_sidecar_config_and_tokenizer_win(
    plain_tiny_gguf: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    path = Path(shutil.copy(plain_tiny_gguf, tmp_path / "model.F32.gguf"))
    assert open_deberta_gguf(path).config["pooler_hidden_act"] == "gelu"

    sidecar = json.loads((tiny_model_dir / "config.json").read_text()) | {"pooler_hidden_act": "tanh"}
    (tmp_path / "config.json").write_text(json.dumps(sidecar))
    model = open_deberta_gguf(path)
    assert model.config["pooler_hidden_act"] == "tanh"
    assert model.config["rerankd_untrained"] is True
    assert DebertaConfig.from_dict(model.config).pooler_hidden_act == "tanh"

    # Antfly's files carry no scores: with tokenizer.json beside them they still open.
    tokens = len(GGUFReader(path).fields["tokenizer.ggml.scores"].data)
    zeroed = rewrite_gguf(
        path,
        tmp_path / "zero-scores.F32.gguf",
        values={"tokenizer.ggml.scores": ([0.0] * tokens, GGUFValueType.ARRAY)},
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    tokenizer = open_deberta_gguf(zeroed).tokenizer()
    assert tokenizer.encode(*PAIRS[0]).ids == load_tokenizer(tiny_model_dir).encode(*PAIRS[0]).ids


def test_find_gguf_variants(tmp_path: Path) -> None:
    for name in ("mxbai.Q8_0.gguf", "mxbai.Q4_K.gguf", "mxbai-f16.gguf", "mxbai.gguf", "notes.Q8_0.txt"):
        (tmp_path / name).touch()
    assert find_gguf_variants(tmp_path) == {
        "Q8_0": tmp_path / "mxbai.Q8_0.gguf",
        "Q4_K": tmp_path / "mxbai.Q4_K.gguf",
        "F16": tmp_path / "mxbai-f16.gguf",
    }
    assert parse_variant_file_name("mxbai-rerank-base-v1.Q4_K.gguf") == ("mxbai-rerank-base-v1", "Q4_K")
    (tmp_path / "other.q8_0.gguf").touch()
    with pytest.raises(GGUFModelError, match="already has a Q8_0 variant"):
        find_gguf_variants(tmp_path)


# --- errors --------------------------------------------------------------------------------------


def _tensor_values(path: Path, name: str) -> np.ndarray:
    return next(tensor for tensor in GGUFReader(path).tensors if tensor.name == name).data


def _written(out: Path, data: bytes) -> Path:
    out.write_bytes(data)
    return out


def _with_first_value_type(plain: Path, out: Path, value_type: int) -> Path:
    """The first key's value type sits after magic, version, the two counts, the key's length and
    the key (general.architecture, 20 bytes): bytes 52-56."""
    data = bytearray(plain.read_bytes())
    data[52:56] = value_type.to_bytes(4, "little")
    return _written(out, bytes(data))


def _zero_scores(plain: Path, out: Path) -> Path:
    tokens = len(GGUFReader(plain).fields["tokenizer.ggml.scores"].data)
    return rewrite_gguf(plain, out, values={"tokenizer.ggml.scores": ([0.0] * tokens, GGUFValueType.ARRAY)})


def _q4_0_pooler(plain: Path, out: Path) -> Path:
    weights = _tensor_values(plain, "pooler.dense.weight")
    q4_0 = GGMLQuantizationType.Q4_0
    return rewrite_gguf(plain, out, tensors={"pooler.dense.weight": (quantize(weights, q4_0), q4_0)})


def _more_tokens_than_embeddings(plain: Path, out: Path) -> Path:
    fields = GGUFReader(plain).fields
    extra = [f"extra{index}" for index in range(3)]
    return rewrite_gguf(
        plain,
        out,
        values={
            "tokenizer.ggml.tokens": (
                fields["tokenizer.ggml.tokens"].contents() + extra,
                GGUFValueType.ARRAY,
            ),
            "tokenizer.ggml.scores": (
                fields["tokenizer.ggml.scores"].contents() + [-20.0] * len(extra),
                GGUFValueType.ARRAY,
            ),
            "tokenizer.ggml.token_type": (
                fields["tokenizer.ggml.token_type"].contents() + [1] * len(extra),
                GGUFValueType.ARRAY,
            ),
        },
    )


BROKEN_FILES = {
    "wrong architecture": (
        lambda plain, out: rewrite_gguf(plain, out, architecture="bert"),
        "general.architecture is 'bert'",
    ),
    "missing key": (
        lambda plain, out: rewrite_gguf(plain, out, drop_keys=["deberta.block_count"]),
        "'deberta.block_count' is missing",
    ),
    "mistyped key": (
        lambda plain, out: rewrite_gguf(
            plain, out, values={"deberta.block_count": ("two", GGUFValueType.STRING)}
        ),
        "expected an integer",
    ),
    "unusable config": (
        lambda plain, out: rewrite_gguf(
            plain, out, values={"deberta.label_count": (5, GGUFValueType.UINT32)}
        ),
        "5 labels",
    ),
    "missing tensor": (
        lambda plain, out: rewrite_gguf(plain, out, drop_tensors=["encoder.layer.1.output.dense.weight"]),
        "encoder.layer.1.output.dense.weight",
    ),
    "misshaped tensor": (
        lambda plain, out: rewrite_gguf(
            plain, out, tensors={"pooler.dense.bias": (np.zeros(257, dtype=np.float32), F32)}
        ),
        "'pooler.dense.bias' has ggml shape \\[257\\]",
    ),
    "unsupported tensor type": (_q4_0_pooler, "stored as Q4_0"),
    "scores all zero": (_zero_scores, "tokenizer.json"),
    "vocabulary lengths differ": (
        lambda plain, out: rewrite_gguf(
            plain, out, values={"tokenizer.ggml.token_type": ([1, 1, 1], GGUFValueType.ARRAY)}
        ),
        "3 token types",
    ),
    "more tokens than embeddings": (
        _more_tokens_than_embeddings,
        "8004 tokens but the word embeddings only 8001",
    ),
    "not a GGUF file": (lambda plain, out: _written(out, b"{}\n"), "not a readable GGUF file"),
    "empty file": (lambda plain, out: _written(out, b""), "not a readable GGUF file"),
    "truncated in metadata": (
        lambda plain, out: _written(out, plain.read_bytes()[:4000]),
        "not a readable GGUF file",
    ),
    "truncated in tensor data": (
        lambda plain, out: _written(out, plain.read_bytes()[:-1000]),
        "not a readable GGUF file",
    ),
    "corrupt value type": (
        lambda plain, out: _with_first_value_type(plain, out, 99),
        "not a readable GGUF file",
    ),
    "no such file": (lambda plain, out: out, "no such file"),
}


def test_the_architecture_is_read_from_the_first_key_or_found_by_parsing(
    plain_tiny_gguf: Path, tmp_path: Path
) -> None:
    """gguf's writer puts general.architecture first, where it is read from the file's first bytes; a file
    that keeps it after another key, or stores its numbers big-endian, is parsed to find it."""
    assert _leading_architecture(plain_tiny_gguf.read_bytes()[:LEADING_BYTES]) == "deberta"
    assert gguf_architecture(plain_tiny_gguf) == "deberta"
    named_first = GGUFWriter(tmp_path / "named-first.gguf", "bert")
    named_first.add_name("a model")
    named_first.kv_data[0] = dict(reversed(named_first.kv_data[0].items()))
    big_endian = GGUFWriter(tmp_path / "big-endian.gguf", "jina-bert-v2", endianess=GGUFEndian.BIG)
    for writer, architecture in ((named_first, "bert"), (big_endian, "jina-bert-v2")):
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        head = Path(writer.path).read_bytes()[:LEADING_BYTES]
        assert _leading_architecture(head) is None
        assert gguf_architecture(Path(writer.path)) == architecture
    huge_key = struct.pack("<4sIQQQ", b"GGUF", 3, 0, 1, 2**64 - 1) + bytes(64)
    for name, data in (("junk.gguf", b"{}\n"), ("huge-key.gguf", huge_key)):
        with pytest.raises(GGUFModelError, match="not a readable GGUF file"):
            gguf_architecture(_written(tmp_path / name, data))


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_broken_files_raise_gguf_model_error(plain_tiny_gguf: Path, tmp_path: Path, case: str) -> None:
    make, message = BROKEN_FILES[case]
    path = make(plain_tiny_gguf, tmp_path / "model.F32.gguf")
    with pytest.raises(GGUFModelError, match=message) as raised:
        open_deberta_gguf(path)
    assert raised.value.path == path
    assert str(path) in str(raised.value)


def test_export_refuses_what_the_layout_cannot_store(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(tiny_model_dir, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(
        json.dumps(config | {"share_att_key": False, "pooler_hidden_act": "tanh"})
    )
    with pytest.raises(GGUFExportError, match=r"share_att_key=False.*pooler_hidden_act='tanh'"):
        export_gguf(source, tmp_path / "model.Q8_0.gguf", "q8_0")
    with pytest.raises(GGUFExportError, match="unknown GGUF type 'q5_k'"):
        export_gguf(tiny_model_dir, tmp_path / "model.Q5_K.gguf", "q5_k")
    assert not list(tmp_path.glob("*.gguf*"))


# --- Antfly's own exporter -----------------------------------------------------------------------


def _antfly_command() -> list[str]:
    if importlib.util.find_spec("antfly_cli") is None:
        pytest.skip("antfly-cli is not installed (pip install antfly-cli)")
    return [sys.executable, "-m", "antfly_cli"]


@pytest.fixture
def antfly() -> Iterator[list[str]]:
    command = _antfly_command()
    probe = subprocess.run([*command, "inference", "export"], capture_output=True, text=True, check=False)
    if "usage: antfly inference export" not in probe.stdout + probe.stderr:
        pytest.skip(f"antfly-cli does not run here: {(probe.stderr or probe.stdout).strip()[-300:]}")
    yield command


@pytest.mark.slow
def test_antfly_exported_q8_0_loads_and_scores(
    antfly: list[str], xsmall_model_dir: Path, xsmall_reference_logits: torch.Tensor, tmp_path: Path
) -> None:
    """Antfly's exporter quantizes the word embeddings too and writes no unigram scores, so its files
    need the tokenizer.json beside them; its Q8_0 bytes are gguf's (ggml's) Q8_0, tensor for tensor."""
    out = tmp_path / "antfly" / "model.Q8_0.gguf"
    out.parent.mkdir()
    options = ["--target", "gguf", "--format", "q8_0", "--output", str(out)]
    subprocess.run(
        [*antfly, "inference", "export", str(xsmall_model_dir), *options],
        check=True,
        capture_output=True,
        timeout=300,
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(xsmall_model_dir / name, out.parent / name)
    model = open_deberta_gguf(out)
    with out.open("rb") as file:  # the backend is picked from the file's first bytes
        assert _leading_architecture(file.read(LEADING_BYTES)) == "deberta"
    assert model.tensor_types["embeddings.word_embeddings.weight"] == "Q8_0"
    assert model.file_type == "Q8_0"
    logits = gguf_logits(model, model.tokenizer())
    assert 0 < (logits - xsmall_reference_logits).abs().max().item() < 0.01

    checkpoint = SafetensorsCheckpoint(xsmall_model_dir)
    for name in ("encoder.layer.3.attention.self.query_proj.weight", "embeddings.word_embeddings.weight"):
        source = checkpoint.read(f"deberta.{name}").float().numpy()
        ggml_q8_0 = torch.from_numpy(dequantize(quantize(source, Q8_0), Q8_0))
        assert torch.equal(model.tensors.read(name), ggml_q8_0), name
