"""The torch backend's host side: how a batch of token ids becomes the padded tensors the network takes."""

from __future__ import annotations

from rerankd.backends.torch_backend import padded_batch


def test_padded_batch_places_each_sequence_from_the_left() -> None:
    padded, mask = padded_batch([[5, 6, 7], [8], [9, 10]], pad_id=0, pin=False)
    assert padded.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_padding_uses_the_models_pad_id() -> None:
    padded, mask = padded_batch([[4], [5, 6, 7, 8]], pad_id=3, pin=False)
    assert padded.tolist() == [[4, 3, 3, 3], [5, 6, 7, 8]]
    assert mask.sum(1).tolist() == [1, 4]
