"""The torch backend's host side: how a batch is padded, the bucketed shapes its CUDA graphs are for, and
where a CPU pass makes way for another."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import BertConfig, BertForSequenceClassification

from rerankd.backends.base import Batch, Pair
from rerankd.backends.cuda_graphs import bucketed_shape
from rerankd.backends.torch_backend import layer_stack, padded_batch

from conftest import load_backend_at


def _batch(*sequences: list[int]) -> Batch:
    return Batch([Pair(ids, len(ids)) for ids in sequences])


def test_padded_batch_places_each_sequence_from_the_left() -> None:
    padded, mask = padded_batch(_batch([5, 6, 7], [8], [9, 10]), (3, 3), pad_id=0, pin=False)
    assert padded.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_rows_past_the_sequences_hold_one_pad_token() -> None:
    """A batch padded to a bucketed shape: extra columns are padding, extra rows one unmasked pad token (so
    no attention row is masked whole)."""
    padded, mask = padded_batch(_batch([5, 6], [7]), (4, 5), pad_id=3, pin=False)
    assert padded.tolist() == [[5, 6, 3, 3, 3], [7, 3, 3, 3, 3], [3] * 5, [3] * 5]
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]


@pytest.mark.parametrize(
    ("pairs", "length", "bucket"),
    [
        (1, 1, (1, 16)),
        (3, 17, (4, 32)),
        (5, 100, (8, 112)),
        (9, 512, (16, 512)),
        (64, 500, (64, 512)),
        (250, 30, (256, 32)),
    ],
)
def test_bucketed_shapes(pairs: int, length: int, bucket: tuple[int, int]) -> None:
    """Pairs to 1, 2, 4, 8, then a multiple of 8; lengths to a multiple of 16."""
    assert bucketed_shape(pairs, length, max_length=512) == bucket


def test_a_bucket_never_passes_the_model_limit() -> None:
    """Lengths round up to a multiple of 16, but not past the model's limit when that is not one."""
    assert bucketed_shape(2, 505, max_length=510) == (2, 510)
    assert bucketed_shape(2, 100, max_length=510) == (2, 112)


def test_a_cpu_pass_makes_way_between_its_steps_for_another(xsmall_model_dir: Path) -> None:
    """Once prepared for serving, a CPU pass calls `between_steps` after each step of each layer and after
    the layer; a whole pass run from there (the scheduler's handover of a short request) changes neither
    its own scores nor the interrupted pass's."""
    backend = load_backend_at(xsmall_model_dir, device="cpu", dtype="float32")
    backend.prepare_for_serving()
    long_batch = _batch(*([1, *range(100, 100 + length), 2] for length in (60, 40, 50)))
    short_batch = _batch([1, 300, 301, 2], [1, 400, 2])
    long_alone, short_alone = backend.relevance_logits(long_batch), backend.relevance_logits(short_batch)
    layers_done: list[int] = []
    short_between: list[float] = []

    def between_steps() -> None:
        layers_done.append(len(layers_done) + 1)
        if len(layers_done) == 3:
            short_between.extend(backend.launch(short_batch).result())

    long_interrupted = backend.launch(long_batch, between_steps).result()
    layers = json.loads((xsmall_model_dir / "config.json").read_text())["num_hidden_layers"]
    steps = sum(len([*layer.children()]) + 1 for layer in layer_stack(backend.model))
    assert steps >= 6 * layers
    assert len(layers_done) >= steps  # every step at least once (DeBERTa's step boundary twice a layer)
    assert long_interrupted == pytest.approx(long_alone, abs=1e-5)
    assert short_between == pytest.approx(short_alone, abs=1e-5)


def test_the_layer_stack_of_a_transformers_encoder() -> None:
    config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    model = BertForSequenceClassification(config)
    assert layer_stack(model) is model.bert.encoder.layer
