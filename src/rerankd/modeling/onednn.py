"""Dense layers whose weights are reordered once for oneDNN, on a CPU.

torch's CPU `linear` hands oneDNN (bf16) or MKL (fp32) a plain row-major weight, and oneDNN reorders a bf16
weight into its kernels' blocked layout on every call. Reordering once, when the model is ready to serve (what
inductor's freezing pass does on a CPU), makes the dense layers faster in both dtypes (in fp32 oneDNN's
kernels beat MKL's), with scores within rounding of the plain layers' (docs/decisions.md).

The two ops are torch's own (`torch.ops.mkldnn`, what inductor emits), not public API, so `pack_dense_layers`
first checks on one layer that they exist and give `F.linear`'s result, and otherwise leaves the model as is.

oneDNN builds one kernel per input shape and keeps it in two caches (its own and ideep's, 1,024 entries each
by default). A server meets many batch shapes, and at the defaults those caches keep growing with them.
`bound_kernel_caches` caps them.

Some layer shapes run far below oneDNN's own rate past a number of rows: on AMX with two threads, base's
feed-forward output (3,072 -> 768) runs from 512 rows on as fast as on one thread. `split_rows_where_faster`
times each shape of a model at the batch's rows, whole and in pieces of `ROW_PIECE`, and has the layers of a
shape that runs clearly faster in pieces cut their rows so (docs/decisions.md).
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)

# Entries of oneDNN's primitive cache, and of ideep's cache of computations (torch's oneDNN wrapper). oneDNN's
# holds a request's passes' kernels (about 130 for base's seven passes of 64 passages), so that they hit on
# its repeat: at 128 each was evicted before its next use. ideep's stays at 128: at 256 too, long documents
# ran 15% slower (docs/decisions.md). Memory stays flat at these sizes.
KERNEL_CACHE_ENTRIES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": 256, "LRU_CACHE_CAPACITY": 128}
# Rows per oneDNN call for a layer whose shape runs faster in pieces; cut only from twice as many rows on
# (below that, one call was the faster where pieces won: docs/decisions.md).
ROW_PIECE = 256
# A shape is cut only where its pieces ran this much faster: well above the spread of timings taken at start.
MIN_PIECES_SPEEDUP = 1.2
TIMED_CALLS = 5


def bound_kernel_caches() -> None:
    """Cap oneDNN's kernel caches, unless the user set them. Both are sized when the first kernel is built, so
    this must run before the process's first oneDNN op."""
    for variable, entries in KERNEL_CACHE_ENTRIES.items():
        os.environ.setdefault(variable, str(entries))


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight in oneDNN's blocked layout, computed by oneDNN's matmul."""

    weight: torch.Tensor  # buffers
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, batch_rows: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The layout is chosen for `batch_rows` rows (the engine's padded-token budget); any count runs.
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight, batch_rows))
        self.register_buffer("bias", linear.bias)
        # Rows per call where this shape runs faster in pieces (`split_rows_where_faster`); None: one call.
        self.row_piece: int | None = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.row_piece is not None and inputs.numel() >= 2 * self.row_piece * self.in_features:
            return self.in_pieces(inputs, self.row_piece)
        return self.matmul(inputs)

    def in_pieces(self, inputs: torch.Tensor, rows: int) -> torch.Tensor:
        """The layer in one oneDNN call per `rows` rows of `inputs`, its leading dimensions counted as rows
        (`transformers`' networks pass (batch, length, features)), as oneDNN counts them in one call."""
        pieces = inputs.reshape(-1, self.in_features).split(rows)
        return torch.cat([self.matmul(piece) for piece in pieces]).view(*inputs.shape[:-1], self.out_features)

    def matmul(self, inputs: torch.Tensor) -> torch.Tensor:
        """The layer in one oneDNN call, whatever the rows."""
        return torch.ops.mkldnn._linear_pointwise(inputs, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN blocked weight"


def pack_dense_layers(model: nn.Module, batch_rows: int) -> bool:
    """Swap every `nn.Linear` of a CPU `model` in float32 or bfloat16 for a `PackedLinear`, one at a time (the
    plain weight is freed as its packed copy takes its place). False, with the model unchanged, where oneDNN
    cannot: another device or dtype, or a torch whose ops are missing or disagree with `F.linear`."""
    # Names, not modules: each plain layer is dropped as soon as its packed copy replaces it.
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    if not names or not _packs(cast(nn.Linear, model.get_submodule(names[0])), batch_rows):
        return False
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, PackedLinear(getattr(parent, attribute), batch_rows))
    return True


def split_rows_where_faster(model: nn.Module, batch_rows: int) -> list[tuple[int, int]]:
    """Time each (in, out) shape of `model`'s packed layers on `batch_rows` rows, in one call and in pieces of
    `ROW_PIECE`, alternately, and set `row_piece` on every layer of a shape whose pieces ran at least
    `MIN_PIECES_SPEEDUP` times faster. Returns those shapes. A few calls per shape, once, when a CPU model is
    prepared for serving: which shapes fall off oneDNN's rate depends on the CPU and the thread count."""
    if batch_rows < 2 * ROW_PIECE:
        return []
    by_shape: dict[tuple[int, int], list[PackedLinear]] = defaultdict(list)
    for module in model.modules():
        if isinstance(module, PackedLinear):
            by_shape[module.in_features, module.out_features].append(module)
    split = []
    generator = torch.Generator().manual_seed(0)
    for shape, layers in by_shape.items():
        layer = layers[0]
        inputs = torch.randn(batch_rows, shape[0], generator=generator).to(layer.weight.dtype)
        whole, pieces = alternate_timings(
            functools.partial(layer.matmul, inputs), functools.partial(layer.in_pieces, inputs, ROW_PIECE)
        )
        if faster_in_pieces(whole, pieces):
            for same in layers:
                same.row_piece = ROW_PIECE
            split.append(shape)
    return split


def faster_in_pieces(whole: list[float], pieces: list[float]) -> bool:
    """Whether a shape's timings, whole and in pieces, call for pieces: their median at least
    `MIN_PIECES_SPEEDUP` times faster."""
    return statistics.median(whole) >= MIN_PIECES_SPEEDUP * statistics.median(pieces)


def alternate_timings(*calls: Callable[[], torch.Tensor], runs: int = TIMED_CALLS) -> list[list[float]]:
    """Seconds of `runs` runs of each call, alternated so that a drift in the machine's speed falls on all of
    them, after one untimed run each (its kernels are built then)."""
    timings: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for call in calls:
            call()
        for _ in range(runs):
            for call, seconds in zip(calls, timings, strict=True):
                start = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - start)
    return timings


def _packs(linear: nn.Linear, batch_rows: int) -> bool:
    weight = linear.weight
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    probe = torch.linspace(-1, 1, 3 * linear.in_features, dtype=weight.dtype).view(3, -1)
    try:
        if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        with torch.inference_mode():
            packed = PackedLinear(linear, batch_rows)(probe)
            plain = F.linear(probe, weight, linear.bias)
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        logger.info("oneDNN weight packing is unavailable in this torch (%s); dense layers stay plain", error)
        return False
    return torch.allclose(packed.float(), plain.float(), rtol=1e-2, atol=1e-2)
