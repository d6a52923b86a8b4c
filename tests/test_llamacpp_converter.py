"""GGUFs written by llama.cpp's own converter, `convert_hf_to_gguf.py` from the installed llama-cpp-python's
sdist (`make install-test` puts it in the venv), from tiny random-weight `transformers` cross-encoders: served
by the llama.cpp backend they score as a float64 run of the model they came from, or are refused at load
naming what the file lacks and what to serve instead."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from rerankd.backends.base import Batch, ModelLoadError, Pair
from rerankd.devtools.llamacpp_convert import CONVERTER, convert_to_gguf
from rerankd.devtools.random_bert_gguf import tiny_bert_vocabulary
from rerankd.devtools.random_encoders import randomize_weights, write_sentencepiece_xlm_roberta
from rerankd.engine.loader import load_engine
from rerankd.quality.beir import BeirDataset, load_beir
from rerankd.settings import RuntimeSettings

from conftest import load_backend_at, needs_llama_cpp, score_error

pytestmark = [
    # Each conversion is a process of its own (the converter imports its own copy of the gguf package).
    pytest.mark.slow,
    needs_llama_cpp,
    pytest.mark.skipif(not CONVERTER.is_file(), reason=f"llama.cpp's converter is not at {CONVERTER}"),
]
# From the float64 truth (the float32 reference is 3e-6 away), measured at most 3.8e-4 (sigmoid scores) and
# 2.9e-3 (logits) on ModernBERT, 1.7e-4 and 8.3e-4 on XLM-R: ggml's GELU reads a float16 table, so its input
# keeps 11 bits. A ModernBERT with global attention in every layer misses by 0.34 (scores), one with the
# global rotary base in the local layers by 0.02.
SCORE_TOLERANCE = 1e-3
LOGIT_TOLERANCE = 6e-3
# The float32 torch backend on the BERT the llama.cpp backend refuses.
TORCH_TOLERANCE = 1e-5
LAYERS = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 128}
BERT_QUERY, BERT_DOCUMENT = "who wrote the novel?", "harper lee wrote to kill a mockingbird."


def convert(folder: Path, family: str) -> Path:
    """The F32 GGUF the converter writes for `folder`, in a folder of its own with the tokenizer.json."""
    return convert_to_gguf(folder, family, folder.parent / f"{folder.name}-gguf")


def tensor_rows(path: Path) -> dict[str, int]:
    """Each tensor of the file by name, with its row count (ggml lists the row length first)."""
    return {tensor.name: int(tensor.shape[-1]) for tensor in gguf.GGUFReader(path).tensors}


def save_model(folder: Path, model: Any) -> Any:
    """`model` with random weights, saved as safetensors beside its tokenizer; returned in float64."""
    randomize_weights(model.eval())
    model.save_pretrained(folder, safe_serialization=True)
    return model.double()


@pytest.fixture(scope="module")
def msmarco(msmarco_dir: Path) -> BeirDataset:
    """What the tokenizers are trained on and the pairs are made of."""
    return load_beir(msmarco_dir)


def xlm_roberta(folder: Path, texts: list[str]) -> tuple[Any, Any]:
    """An XLMRobertaForSequenceClassification (in float64) and its tokenizer: a SentencePiece unigram model
    saved as `sentencepiece.bpe.model` (what the converter reads), which transformers turns into
    `<s> A </s></s> B </s>` pairs in the fairseq ids."""
    from transformers import XLMRobertaForSequenceClassification, XLMRobertaTokenizer

    write_sentencepiece_xlm_roberta(folder, texts, layers=LAYERS)
    model = XLMRobertaForSequenceClassification.from_pretrained(folder, dtype=torch.float64).eval()
    return model, XLMRobertaTokenizer.from_pretrained(folder)


def modernbert(folder: Path, texts: list[str]) -> tuple[Any, Any]:
    """A ModernBertForSequenceClassification and its byte-level BPE tokenizer (`[CLS] A [SEP] B [SEP]`). Its
    local attention spans 8 tokens (ModernBERT's own, 128), so that the pairs here reach past it."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification, PreTrainedTokenizerFast

    special = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"}
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=[*special.values(), "[MASK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(token, bpe.token_to_id(token)) for token in ("[CLS]", "[SEP]")],
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, mask_token="[MASK]", **special)
    tokenizer.save_pretrained(folder)
    cls_id, sep_id = bpe.token_to_id("[CLS]"), bpe.token_to_id("[SEP]")
    config = ModernBertConfig(
        vocab_size=bpe.get_vocab_size(),
        max_position_embeddings=512,
        local_attention=8,
        global_attn_every_n_layers=3,
        num_labels=1,
        pad_token_id=bpe.token_to_id("[PAD]"),
        # As in ModernBERT's own config, [CLS] is also its BOS and [SEP] its EOS.
        cls_token_id=cls_id,
        bos_token_id=cls_id,
        sep_token_id=sep_id,
        eos_token_id=sep_id,
        **LAYERS,
    )
    return save_model(folder, ModernBertForSequenceClassification(config)), tokenizer


# Each family's model and tokenizer.
FAMILIES: dict[str, Callable[[Path, list[str]], tuple[Any, Any]]] = {
    "xlm-roberta": xlm_roberta,
    "modernbert": modernbert,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_scores_match_transformers(family: str, msmarco: BeirDataset, tmp_path: Path) -> None:
    build = FAMILIES[family]
    texts = list(msmarco.passages.values())[:1000]
    (tmp_path / family).mkdir()
    model, tokenizer = build(tmp_path / family, texts)
    path = convert(tmp_path / family, family)
    query = next(iter(msmarco.queries.values()))
    documents = texts[:80:10]
    encodings = [tokenizer(query, document, return_tensors="pt") for document in documents]
    with torch.no_grad():
        expected = [model(**encoding).logits[0, 0].item() for encoding in encodings]
    engine = load_engine(str(path), RuntimeSettings(device="cpu", threads=1))
    try:
        assert engine.info.backend == "llamacpp"
        assert max(encoding["input_ids"].shape[1] for encoding in encodings) <= engine.info.max_length
        scored = asyncio.run(engine.score(query, documents))
    finally:
        engine.close()
    assert scored.token_count == sum(encoding["input_ids"].shape[1] for encoding in encodings)
    assert len({round(value, 1) for value in expected}) > 3, "the random model should spread its scores"
    assert np.max(np.abs(np.array(scored.logits) - expected)) <= LOGIT_TOLERANCE
    assert score_error(scored.logits, expected) <= SCORE_TOLERANCE


def test_bert_without_its_pooler_is_refused(tmp_path: Path) -> None:
    """The converter keeps BERT's token types but drops its pooler, which the score needs: the file is refused
    for that, and the safetensors folder it names serves the model on the torch backend."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path / "bert"
    folder.mkdir()
    vocabulary = tiny_bert_vocabulary()
    (folder / "vocab.txt").write_text("\n".join(vocabulary) + "\n")
    tokenizer = BertTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocabulary),
        type_vocab_size=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        **LAYERS,
    )
    model = save_model(folder, BertForSequenceClassification(config))
    path = convert(folder, "bert")
    rows = tensor_rows(path)
    assert rows["token_types.weight"] == 2 and "cls.output.weight" in rows and "cls.weight" not in rows
    with pytest.raises(ModelLoadError, match=r"no pooler \(cls\).*safetensors folder .* torch backend"):
        load_backend_at(path, device="cpu")

    encoding = tokenizer(BERT_QUERY, BERT_DOCUMENT)
    pair = Pair(encoding["input_ids"], encoding["token_type_ids"].index(1))
    assert pair.token_type_ids == encoding["token_type_ids"]
    with torch.no_grad():
        expected = model(**tokenizer(BERT_QUERY, BERT_DOCUMENT, return_tensors="pt")).logits[0, 0].item()
    backend = load_backend_at(folder, device="cpu", dtype="float32")
    assert backend.info.backend == "torch"
    assert abs(backend.relevance_logits(Batch([pair]))[0] - expected) <= TORCH_TOLERANCE
