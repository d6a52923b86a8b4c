"""The project's DeBERTa equals the reference, transformers' DebertaV2ForSequenceClassification, in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

from rerankd.backends import torch_backend
from rerankd.backends.cuda_graphs import bucketed_shape, bucketed_shapes
from rerankd.catalog import CATALOG, deberta_v3_config
from rerankd.devtools.random_model import random_checkpoint
from rerankd.engine.precision import MAX_SCORE_DELTA
from rerankd.modeling.config import DebertaConfig, UnsupportedModelError
from rerankd.modeling.deberta import TokenLayout, attend
from rerankd.modeling.onednn import PackedLinear, pack_dense_layers
from rerankd.modeling.weights import CheckpointError, load_reranker

from conftest import SHARED_CONFIGS

PARITY_BOUND = 1e-4
CPU = torch.device("cpu")


class DictReader:
    """A TensorReader over an in-memory state dict (the reference model's own tensor names)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def names(self):
        return self.tensors.keys()

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def geometry_config(geometry: str) -> dict:
    """The real config.json from ../shared when present, else the catalog's identical geometry."""
    shared = SHARED_CONFIGS / f"mxbai-rerank-{geometry}-v1.json"
    if shared.exists():
        return json.loads(shared.read_text())
    return deberta_v3_config(CATALOG[geometry].geometry)


def padded_batch(lengths: list[int], vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    input_ids = torch.zeros((len(lengths), longest), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(4, vocab - 1, (length,), generator=generator)
        input_ids[row, 0] = 1
        mask[row, :length] = 1
    return input_ids, mask


def reference_model(config: dict, tensors: dict[str, torch.Tensor]) -> DebertaV2ForSequenceClassification:
    reference = DebertaV2ForSequenceClassification(DebertaV2Config(**config)).eval()
    result = reference.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    assert not result.unexpected_keys and all("position_ids" in key for key in result.missing_keys)
    return reference


def reference_and_ours(config: dict, tensors: dict[str, torch.Tensor]):
    reference = reference_model(config, tensors)
    ours = load_reranker(DebertaConfig.from_dict(config), DictReader(tensors), torch.float32, CPU)
    return reference, ours


def max_logit_difference(reference, ours, lengths: list[int], vocab: int, seed: int = 0) -> float:
    input_ids, mask = padded_batch(lengths, vocab, seed)
    with torch.inference_mode():
        expected = reference(input_ids=input_ids, attention_mask=mask).logits
        actual = ours(input_ids, mask)
    assert actual.shape == expected.shape
    return (actual - expected).abs().max().item()


# Lengths 1…512 across padded batches: short (identity buckets), around the log-bucket boundary (128/129),
# and the full 512 window.
BATCHES = {
    "xsmall": [[1, 2, 3, 17], [64, 127, 128, 129, 130, 200], [511, 512, 300, 5]],
    "base": [[1, 9, 40], [129, 128, 250], [512, 77]],
}


@pytest.mark.parametrize("geometry", ["xsmall", "base"])
def test_parity_at_real_geometry(geometry: str) -> None:
    config = geometry_config(geometry)
    # A wider init than the config's 0.02 makes attention far from uniform and logits O(1): the check bites.
    tensors = random_checkpoint({**config, "initializer_range": 0.1}, seed=1, dtype=torch.float16)
    reference, ours = reference_and_ours(config, tensors)
    for seed, lengths in enumerate(BATCHES[geometry]):
        difference = max_logit_difference(reference, ours, lengths, config["vocab_size"], seed)
        assert difference <= PARITY_BOUND, f"{geometry} {lengths}: max |Δlogit| {difference:.2e}"


def test_parity_with_dense_layers_packed_for_onednn() -> None:
    """What a CPU serves: every dense layer through oneDNN with a pre-reordered weight, still within the
    parity bound in float32; in bfloat16 (at the config's own init), within the bound `--dtype auto` holds
    bf16 to. (At the wide init both plain and packed bf16 layers drift past it, packed slightly less.)"""
    config = geometry_config("xsmall")
    tensors = random_checkpoint({**config, "initializer_range": 0.1}, seed=1, dtype=torch.float16)
    reference, ours = reference_and_ours(config, tensors)
    assert pack_dense_layers(ours, batch_rows=1024)
    assert not any(type(module) is torch.nn.Linear for module in ours.modules())
    for seed, lengths in enumerate(BATCHES["xsmall"]):
        difference = max_logit_difference(reference, ours, lengths, config["vocab_size"], seed)
        assert difference <= PARITY_BOUND, f"packed {lengths}: max |Δlogit| {difference:.2e}"

    tensors = random_checkpoint(config, seed=1, dtype=torch.float16)
    reference = reference_model(config, tensors)
    packed = load_reranker(DebertaConfig.from_dict(config), DictReader(tensors), torch.bfloat16, CPU)
    assert pack_dense_layers(packed, batch_rows=1024)
    input_ids, mask = padded_batch([5, 60, 130, 300], config["vocab_size"], seed=7)
    with torch.inference_mode():
        drift = packed(input_ids, mask).float().sigmoid() - reference(input_ids, mask).logits.sigmoid()
    assert drift.abs().max().item() <= MAX_SCORE_DELTA


def test_dense_layers_stay_plain_where_onednn_does_not_pack() -> None:
    """float16 on a CPU has no packed oneDNN path here: the model is left as it was."""
    tensors = random_checkpoint(TINY, seed=0, dtype=torch.float32)
    ours = load_reranker(DebertaConfig.from_dict(TINY), DictReader(tensors), torch.float16, CPU)
    assert not pack_dense_layers(ours, batch_rows=1024)
    assert all(type(module) is not PackedLinear for module in ours.modules())


TINY = {
    **deberta_v3_config(CATALOG["xsmall"].geometry, vocab_size=300),
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pooler_hidden_size": 64,
}

VARIANTS = {
    "v3": {},
    "two-labels": {"id2label": {"0": "NO", "1": "YES"}, "label2id": {"NO": 0, "YES": 1}},
    "separate-position-projections": {"share_att_key": False},
    "c2p-only": {"pos_att_type": ["c2p"]},
    "p2c-only": {"pos_att_type": "p2c"},
    "no-relative-attention": {"relative_attention": False, "position_biased_input": True},
    "absolute-and-relative": {"position_biased_input": True},
    "unbucketed-relative": {"position_buckets": -1, "max_relative_positions": 48},
    "no-relative-norm": {"norm_rel_ebd": "none"},
    "embedding-projection": {"embedding_size": 32},
    "tanh-gelu": {"hidden_act": "gelu_new", "pooler_hidden_act": "tanh"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_across_config_variants(variant: str) -> None:
    """Every config path the network accepts is checked against the reference's own random init."""
    config = {**TINY, **VARIANTS[variant]}
    torch.manual_seed(0)
    reference = DebertaV2ForSequenceClassification(DebertaV2Config(**config)).eval()
    for parameter in reference.parameters():  # widen the init so every term matters
        parameter.data.normal_(0.0, 0.2)
    tensors = {k: v for k, v in reference.state_dict().items() if "position_ids" not in k}
    ours = load_reranker(DebertaConfig.from_dict(config), DictReader(tensors), torch.float32, CPU)
    difference = max_logit_difference(reference, ours, [1, 7, 60, 150, 512], config["vocab_size"])
    assert difference <= PARITY_BOUND, f"{variant}: max |Δlogit| {difference:.2e}"


def test_two_label_relevance_is_probability_of_label_one() -> None:
    config = {**TINY, **VARIANTS["two-labels"]}
    torch.manual_seed(0)
    reference = DebertaV2ForSequenceClassification(DebertaV2Config(**config)).eval()
    tensors = {k: v for k, v in reference.state_dict().items() if "position_ids" not in k}
    ours = load_reranker(DebertaConfig.from_dict(config), DictReader(tensors), torch.float32, CPU)
    input_ids, mask = padded_batch([5, 30], config["vocab_size"], seed=3)
    with torch.inference_mode():
        expected = torch.softmax(reference(input_ids=input_ids, attention_mask=mask).logits, -1)[:, 1]
        actual = torch.sigmoid(ours.relevance_logits(input_ids, mask))
    assert torch.allclose(actual, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"conv_kernel_size": 3}, "conv_kernel_size"),
        ({"pos_att_type": ["p2c", "p2p"]}, "pos_att_type"),
        ({"id2label": {"0": "a", "1": "b", "2": "c"}}, "3 labels"),
        ({"model_type": "bert"}, "model_type"),
        ({"architectures": ["DebertaV2ForMaskedLM"]}, "sequence-classification"),
        ({"hidden_act": "mish"}, "hidden_act"),
        ({"type_vocab_size": 2}, "type_vocab_size"),
        ({"norm_rel_ebd": "batch_norm"}, "norm_rel_ebd"),
    ],
)
def test_unsupported_configs_fail_with_a_clear_message(change: dict, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        DebertaConfig.from_dict({**TINY, **change})


def test_checkpoint_problems_name_the_tensor(tmp_path: Path) -> None:
    tensors = random_checkpoint(TINY, seed=0, dtype=torch.float32)
    config = DebertaConfig.from_dict(TINY)
    missing = {k: v for k, v in tensors.items() if k != "classifier.weight"}
    with pytest.raises(CheckpointError, match=r"classifier\.weight"):
        load_reranker(config, DictReader(missing), torch.float32, CPU)
    misshaped = {**tensors, "deberta.encoder.layer.1.output.dense.bias": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"layer.1.output.dense.bias.*shape"):
        load_reranker(config, DictReader(misshaped), torch.float32, CPU)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_load_straight_into_the_target_dtype(dtype: torch.dtype) -> None:
    tensors = random_checkpoint(TINY, seed=0, dtype=torch.float32)
    model = load_reranker(DebertaConfig.from_dict(TINY), DictReader(tensors), dtype, CPU)
    assert {parameter.dtype for parameter in model.parameters()} == {dtype}
    assert model.layers[0].relative_keys.dtype == dtype


@pytest.mark.parametrize("length", [1, 37, 130])
@pytest.mark.parametrize("first_query_only", [False, True])
def test_attention_equals_torch_sdpa(length: int, first_query_only: bool) -> None:
    """The model's matmul attention and torch's `scaled_dot_product_attention` give the same context, with
    padded keys masked by the dtype's lowest value as the model does; also for one query row against every
    key (the last layer)."""
    generator = torch.Generator().manual_seed(length)
    heads, batch, size = 3, 2, 16
    queries = 1 if first_query_only else length
    query = torch.randn(heads, batch, queries, size, generator=generator)
    key, value = (torch.randn(heads, batch, length, size, generator=generator) for _ in range(2))
    bias = torch.randn(heads, batch, queries, length, generator=generator)
    bias[:, 1, :, length // 2 + 1 :] = torch.finfo(torch.float32).min  # the second pair is padded
    fused = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=1.0)
    assert torch.allclose(attend(query, key, value, bias), fused, atol=1e-5)


def test_token_layout_packs_the_tokens_and_pads_with_zeros() -> None:
    """The dense layers see a batch's tokens alone, in order, and attention sees them back in place with
    zeros (finite, so masked keys and values add nothing) at the padding."""
    _, mask = padded_batch([3, 1, 4], vocab=10, seed=0)
    layout = TokenLayout.from_mask(mask)
    padded = torch.arange(3 * 4 * 2, dtype=torch.float32).view(12, 2) + 1
    packed = layout.packed(padded)
    assert packed[:, 0].tolist() == [1, 3, 5, 9, 17, 19, 21, 23]
    assert layout.first_tokens.tolist() == [0, 3, 4]
    restored = layout.padded(packed)
    assert restored.shape == (3, 4, 2)
    assert torch.equal(restored[mask.bool()], packed)
    assert not restored[~mask.bool()].any()


def test_a_batch_padded_to_a_bucketed_shape_scores_as_the_packed_batch() -> None:
    """What a CUDA graph computes: the batch padded to its bucket (more columns, and rows holding one pad
    token), every position computed (`TokenLayout.dense`). Its pairs' logits equal the packed pass's and
    the reference's."""
    config = geometry_config("xsmall")
    tensors = random_checkpoint({**config, "initializer_range": 0.1}, seed=2, dtype=torch.float16)
    reference, ours = reference_and_ours(config, tensors)
    lengths = [5, 40, 129]
    input_ids, mask = padded_batch(lengths, config["vocab_size"], seed=3)
    shape = bucketed_shape(len(lengths), max(lengths), max_length=512)
    assert shape == (4, 144)
    bucketed_ids, bucketed_mask = torch_backend.padded_batch(
        [row[: int(real.sum())].tolist() for row, real in zip(input_ids, mask, strict=True)],
        shape,
        pad_id=0,
        pin=False,
    )
    with torch.inference_mode():
        expected = reference(input_ids=input_ids, attention_mask=mask).logits
        packed = ours(input_ids, mask)
        bucketed = ours(bucketed_ids, bucketed_mask, TokenLayout.dense(*shape, CPU))
    assert torch.isfinite(bucketed).all()
    assert (bucketed[: len(lengths)] - packed).abs().max().item() <= 1e-5
    assert (bucketed[: len(lengths)] - expected).abs().max().item() <= PARITY_BOUND


@pytest.mark.parametrize(
    ("batch_tokens", "batch_pairs", "max_length"), [(16384, 64, 512), (1024, 64, 512), (4096, 7, 500)]
)
def test_every_reachable_bucket_is_captured_up_front(
    batch_tokens: int, batch_pairs: int, max_length: int
) -> None:
    """The shapes captured when a model is prepared are exactly those of the batches the scheduler can form
    (any number of pairs up to the cap, any longest pair within the budget), biggest first."""
    reachable = {
        bucketed_shape(pairs, length, max_length)
        for pairs in range(1, batch_pairs + 1)
        for length in range(1, max_length + 1)
        if pairs * length <= batch_tokens
    }
    shapes = bucketed_shapes(batch_tokens, batch_pairs, max_length)
    assert set(shapes) == reachable and len(shapes) == len(reachable)
    areas = [rows * length for rows, length in shapes]
    assert areas == sorted(areas, reverse=True)
    if (batch_tokens, batch_pairs) == (16384, 64):
        assert len(shapes) == 319


def test_dense_layout_counts_every_position() -> None:
    layout = TokenLayout.dense(3, 4, CPU)
    assert layout.token_rows.tolist() == list(range(12))
    assert layout.first_tokens.tolist() == [0, 4, 8]
    rows = torch.arange(24, dtype=torch.float32).view(12, 2)
    padded = layout.padded(layout.packed(rows))
    assert torch.equal(padded, rows.view(3, 4, 2))
    assert padded.data_ptr() == rows.data_ptr()  # views, not copies
