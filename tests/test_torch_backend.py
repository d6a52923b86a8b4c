"""The torch backend's host side: how a batch is padded, and the bucketed shapes its CUDA graphs are for."""

from __future__ import annotations

import pytest

from rerankd.backends.base import Batch, Pair
from rerankd.backends.cuda_graphs import bucketed_shape
from rerankd.backends.torch_backend import padded_batch


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
