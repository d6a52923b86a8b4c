"""The project's DeBERTa equals the reference, transformers' DebertaV2ForSequenceClassification, in fp32:
no further from a float64 run of the reference than the float32 reference itself is (tests/parity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

from rerankd.backends import torch_backend
from rerankd.backends.base import Batch, Pair
from rerankd.backends.cuda_graphs import bucketed_shape, bucketed_shapes
from rerankd.catalog import CATALOG, deberta_v3_config
from rerankd.devtools.random_model import random_checkpoint
from rerankd.engine.precision import MAX_SCORE_DELTA
from rerankd.modeling.config import DebertaConfig, UnsupportedModelError
from rerankd.modeling.deberta import CPU_ROW_MULTIPLE, DebertaReranker, TokenLayout, attend
from rerankd.modeling.onednn import PackedLinear, pack_dense_layers
from rerankd.modeling.relative import RelativeProjections
from rerankd.modeling.weights import CheckpointError, load_reranker

from parity import (
    BATCHES,
    CPU,
    MUTANTS,
    DictReader,
    Truth,
    TruthErrors,
    bf16_score_drift,
    bf16_truth,
    geometry_config,
    load_ours,
    packed_for_onednn,
    padded_batch,
    reference_model,
    wide_checkpoint,
)


@pytest.fixture(scope="module", params=["xsmall", pytest.param("base", marks=pytest.mark.slow)])
def truth(request: pytest.FixtureRequest) -> Truth:
    """A wide-init checkpoint at a real geometry, with its float64 and float32 reference logits."""
    config = geometry_config(request.param)
    return Truth(config, wide_checkpoint(config), BATCHES[request.param])


def test_parity_at_real_geometry(truth: Truth) -> None:
    for lengths, errors in zip(
        truth.batches, truth.per_batch(load_ours(truth.config, truth.tensors)), strict=True
    ):
        assert errors.holds, f"{lengths}: {errors}"


def test_parity_with_dense_layers_packed_for_onednn(truth: Truth) -> None:
    """What a CPU serves: every dense layer through oneDNN with a pre-reordered weight."""
    ours = packed_for_onednn(load_ours(truth.config, truth.tensors))
    assert not any(type(module) is torch.nn.Linear for module in ours.modules())
    for lengths, errors in zip(truth.batches, truth.per_batch(ours), strict=True):
        assert errors.holds, f"packed {lengths}: {errors}"


def test_parity_with_the_packed_rows_rounded_up_as_a_cpu_backend_lays_them_out(truth: Truth) -> None:
    """The CPU backend's layout: the dense layers see a multiple of `CPU_ROW_MULTIPLE` rows, the tokens'
    then repeats of the first token's, which no output reads."""
    packed = packed_for_onednn(load_ours(truth.config, truth.tensors))

    def ours(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        layout = TokenLayout.from_mask(mask, CPU_ROW_MULTIPLE)
        assert len(layout.packed_rows) % CPU_ROW_MULTIPLE == 0
        return packed(input_ids, mask, layout)

    for lengths, errors in zip(truth.batches, truth.per_batch(ours), strict=True):
        assert errors.holds, f"rounded up {lengths}: {errors}"


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_the_parity_bound_catches_a_deliberate_bug(truth: Truth, mutant: str) -> None:
    errors = truth.errors(MUTANTS[mutant](truth.config, truth.tensors))
    assert not errors.holds, f"{mutant} passed: {errors}"


def test_bf16_packed_for_onednn_holds_the_auto_bound() -> None:
    """In bfloat16, at the config's own init, within the bound `--dtype auto` holds bf16 to. (At the wide
    init both plain and packed bf16 layers drift past it, packed slightly less.)"""
    config = geometry_config("xsmall")
    assert bf16_score_drift(config, *bf16_truth(config)) <= MAX_SCORE_DELTA


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
    errors = Truth(config, tensors, [[1, 7, 60, 150, 512]]).errors(load_ours(config, tensors))
    assert errors.holds, f"{variant}: {errors}"


def test_two_label_relevance_is_probability_of_label_one() -> None:
    config = {**TINY, **VARIANTS["two-labels"]}
    torch.manual_seed(0)
    reference = DebertaV2ForSequenceClassification(DebertaV2Config(**config)).eval()
    tensors = {k: v for k, v in reference.state_dict().items() if "position_ids" not in k}
    ours = load_ours(config, tensors)
    input_ids, mask = padded_batch([5, 30], config["vocab_size"], seed=3)

    def probability_of_label_one(model: DebertaV2ForSequenceClassification) -> torch.Tensor:
        return torch.softmax(model(input_ids=input_ids, attention_mask=mask).logits, -1)[:, 1]

    with torch.inference_mode():
        errors = TruthErrors.of(
            torch.sigmoid(ours.relevance_logits(input_ids, mask)),
            probability_of_label_one(reference),
            probability_of_label_one(reference_model(config, tensors, torch.float64)),
        )
    assert errors.holds, str(errors)


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


@pytest.mark.parametrize("length", [1, 63, 65, 130, 250, 505, 512])
@pytest.mark.parametrize("terms", [("c2p", "p2c"), ("c2p",), ("p2c",)])
def test_blocked_relative_terms_equal_their_gathered_definition(length: int, terms: tuple[str, ...]) -> None:
    """The relative terms multiplied block by block and read as strided views equal their definition, one
    gathered table row per (i, j) (c2p: query_i . key_table[slot(i - j)]; p2c: key_j . query_table[slot(i -
    j)]), plus the key mask, at lengths that fill their blocks exactly and ones padded past L."""
    config = DebertaConfig.from_dict(geometry_config("xsmall"))
    model = DebertaReranker(config)
    generator = torch.Generator().manual_seed(length)
    heads, batch, size, rows = 3, 2, 8, 2 * config.relative_span
    query, key = (
        torch.randn(heads, batch, length, size, generator=generator, dtype=torch.float64) for _ in "qk"
    )
    tables = {
        term: torch.randn(heads, rows, size, generator=generator, dtype=torch.float64) for term in terms
    }
    mask_bias = torch.zeros(1, batch, 1, length, dtype=torch.float64)
    mask_bias[..., length // 2 + 1 :] = -1e9
    projections = RelativeProjections(tables.get("c2p"), tables.get("p2c"), lambda tensor: tensor)
    bias = model.relative_index(length).attention_bias(mask_bias, query, key, projections)
    positions = torch.arange(length)
    offset = config.max_position_embeddings - 1
    slots = model.slot_table[positions[:, None] - positions[None, :] + offset]  # (i, j)
    expected = mask_bias.expand(heads, batch, length, length).clone()
    if "c2p" in tables:
        expected += torch.einsum("hbis,hijs->hbij", query, tables["c2p"][:, slots])
    if "p2c" in tables:
        expected += torch.einsum("hbjs,hijs->hbij", key, tables["p2c"][:, slots])
    assert bias.shape == (heads, batch, length, length)
    assert torch.allclose(bias, expected, rtol=0, atol=1e-9)


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
    # Q/K/V projected for 2 heads of 3 features: (tokens, 3 parts x 2 heads x 3) laid out per part and head
    projected = torch.arange(8 * 18, dtype=torch.float32).view(8, 18) + 1
    per_head = layout.padded_heads(projected, heads=2, size=3)
    assert per_head.shape == (3, 2, 3, 4, 3) and per_head.is_contiguous()
    by_part_and_head = projected.view(8, 3, 2, 3)
    for part in range(3):
        for head in range(2):
            assert torch.equal(per_head[part, head][mask.bool()], by_part_and_head[:, part, head])
            assert not per_head[part, head][~mask.bool()].any()
    # attention's output, (heads, batch, length, size), back to the packed tokens
    by_position = per_head[1].permute(1, 2, 0, 3).reshape(12, 6)
    assert torch.equal(layout.packed(by_position), by_part_and_head[:, 1].reshape(8, 6))


def test_token_layout_rounds_the_packed_rows_up_with_repeats_of_the_first_token() -> None:
    """Packed rows past the tokens repeat the first token's; laid out by head, only the tokens' rows land."""
    _, mask = padded_batch([3, 1, 4], vocab=10, seed=0)
    exact, rounded = TokenLayout.from_mask(mask), TokenLayout.from_mask(mask, row_multiple=5)
    padded = torch.arange(3 * 4 * 2, dtype=torch.float32).view(12, 2) + 1
    assert rounded.packed(padded)[:, 0].tolist() == [1, 3, 5, 9, 17, 19, 21, 23, 1, 1]
    assert torch.equal(rounded.first_tokens, exact.first_tokens)
    projected = torch.arange(10 * 18, dtype=torch.float32).view(10, 18) + 1
    per_head = rounded.padded_heads(projected, heads=2, size=3)
    assert torch.equal(per_head, exact.padded_heads(projected[:8], heads=2, size=3))
    assert TokenLayout.from_mask(mask, row_multiple=4).packed_rows.tolist() == exact.token_rows.tolist()


def test_token_layout_without_padding_copies_plainly_and_packs_as_a_view() -> None:
    """Pairs of one length: every position is a token, so laying out by head is the scatter's result by a
    plain copy, and packing a view unless rows were added to round the count up."""
    mask = torch.ones(2, 3, dtype=torch.long)
    exact, rounded = TokenLayout.from_mask(mask), TokenLayout.from_mask(mask, row_multiple=4)
    assert exact.all_positions and rounded.all_positions
    assert not TokenLayout.from_mask(padded_batch([3, 2], vocab=10, seed=0)[1]).all_positions
    assert exact.first_tokens.tolist() == rounded.first_tokens.tolist() == [0, 3]
    rows = torch.arange(6 * 2, dtype=torch.float32).view(6, 2)
    assert exact.packed(rows).data_ptr() == rows.data_ptr()  # a view, not a copy
    assert rounded.packed(rows)[:, 0].tolist() == [0, 2, 4, 6, 8, 10, 0, 0]
    projected = torch.arange(8 * 12, dtype=torch.float32).view(8, 12)
    # (parts, heads, batch, length, size)
    by_part_and_head = projected[:6].view(2, 3, 3, 2, 2).permute(2, 3, 0, 1, 4)
    for layout in (exact, rounded):
        per_head = layout.padded_heads(projected[: len(layout.packed_rows)], heads=2, size=2)
        assert per_head.is_contiguous() and torch.equal(per_head, by_part_and_head)


def test_a_batch_padded_to_a_bucketed_shape_scores_as_the_packed_batch() -> None:
    """What a CUDA graph computes: the batch padded to its bucket (more columns, and rows holding one pad
    token), every position computed (`TokenLayout.dense`). Its pairs' logits hold the parity bound as the
    packed pass's do."""
    config = geometry_config("xsmall")
    lengths = [5, 40, 129]
    truth = Truth(config, wide_checkpoint(config, seed=2), [lengths])
    ours = load_ours(config, truth.tensors)
    input_ids, mask = truth.inputs[0]
    shape = bucketed_shape(len(lengths), max(lengths), max_length=512)
    assert shape == (4, 144)
    bucketed_ids, bucketed_mask = torch_backend.padded_batch(
        Batch(
            [
                Pair(row[real.bool()].tolist(), second_segment=int(real.sum()))
                for row, real in zip(input_ids, mask, strict=True)
            ]
        ),
        shape,
        pad_id=0,
        pin=False,
    )
    with torch.inference_mode():
        bucketed = ours(bucketed_ids, bucketed_mask, TokenLayout.dense(*shape, CPU))
    assert torch.isfinite(bucketed).all()
    errors = TruthErrors.of(bucketed[: len(lengths)], truth.reference[0], truth.truth[0])
    assert errors.holds, f"bucketed: {errors}"
    assert truth.errors(ours).holds, f"packed: {truth.errors(ours)}"


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
    assert layout.packed(rows).data_ptr() == rows.data_ptr()  # a view, not a copy
    per_head = layout.padded_heads(rows, heads=2, size=1)
    assert torch.equal(per_head, rows.view(3, 4, 1, 2, 1).permute(2, 3, 0, 1, 4))
