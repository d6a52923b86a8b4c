"""Dense layers packed for oneDNN: cut into pieces of rows where a shape runs faster so."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rerankd.modeling.onednn import (
    ROW_PIECE,
    PackedLinear,
    faster_in_pieces,
    pack_dense_layers,
    split_rows_where_faster,
)


def packed(*layers: nn.Linear) -> nn.Sequential:
    model = nn.Sequential(*layers).eval()
    if not pack_dense_layers(model, batch_rows=2 * ROW_PIECE):
        pytest.skip("oneDNN packing is unavailable in this torch")
    return model


def test_a_layer_cut_into_pieces_of_rows_computes_what_one_call_does() -> None:
    """Each row's output is its own dot products, however the rows are cut; leading dimensions count as rows
    (`transformers`' networks pass (batch, length, features)); fewer rows than two pieces run in one call."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    weight, bias = linear.weight.detach().double(), linear.bias.detach().double()
    layer = packed(linear)[0]
    assert isinstance(layer, PackedLinear)
    layer.row_piece = 16
    inputs = torch.randn(40, 64)
    assert (layer(inputs).double() - (inputs.double() @ weight.T + bias)).abs().max() < 1e-5
    assert torch.equal(layer(inputs), torch.cat([layer.matmul(piece) for piece in inputs.split(16)]))
    one_call, calls = layer.matmul, []
    layer.matmul = lambda piece: calls.append(len(piece)) or one_call(piece)  # type: ignore[method-assign]
    assert torch.equal(layer(inputs.view(2, 20, 64)), layer(inputs).view(2, 20, 32))
    assert calls == [16, 16, 8] * 2
    del layer.matmul
    assert torch.equal(layer(inputs[:31]), layer.matmul(inputs[:31]))


def test_every_layer_of_a_split_shape_is_cut_and_no_other() -> None:
    torch.manual_seed(0)
    model = packed(nn.Linear(64, 256), nn.Linear(256, 64), nn.Linear(64, 256))
    split = split_rows_where_faster(model, batch_rows=2 * ROW_PIECE)
    assert set(split) <= {(64, 256), (256, 64)}
    for layer in model:
        assert isinstance(layer, PackedLinear)
        in_split = (layer.in_features, layer.out_features) in split
        assert layer.row_piece == (ROW_PIECE if in_split else None)


def test_fewer_rows_than_two_pieces_are_never_timed_or_cut() -> None:
    model = packed(nn.Linear(64, 256))
    assert split_rows_where_faster(model, batch_rows=2 * ROW_PIECE - 1) == []
    assert model[0].row_piece is None


@pytest.mark.parametrize(
    ("whole", "pieces", "cut"),
    [
        ([1.0] * 5, [0.8] * 5, True),  # 1.25x
        ([1.0] * 5, [0.85] * 5, False),  # 1.18x: within what a start's timings can drift
        ([1.0, 1.0, 1.0, 1.0, 9.0], [1.0] * 5, False),  # one slow call decides nothing
        ([2.0, 2.0, 2.0, 0.1, 0.1], [1.0, 1.0, 1.0, 1.0, 9.0], True),
    ],
)
def test_pieces_are_chosen_only_when_clearly_faster(
    whole: list[float], pieces: list[float], cut: bool
) -> None:
    assert faster_in_pieces(whole, pieces) is cut
