"""ggml's Q4_K reference quantizer (`quantize_row_q4_K_ref`) in numpy, bit-identical to ggml.

We write GGUF files ourselves, so the bytes must be what llama.cpp would have written for the same
float32 weights (no imatrix). A 256-value block is eight 32-value sub-blocks; each gets a scale and a
min from ggml's `make_qkx2_quants` search, those are quantized to 6 bits against the block's largest,
and the values are re-quantized to 4 bits with the final scales. Every float operation below is the
float32 operation ggml performs, in ggml's order: sums run one term after another (numpy's pairwise
summation would round differently), rounding is ggml's `nearest_int` magic-number trick, and no
Python float is allowed to promote a step to float64. The work is vectorized over sub-blocks and the
blocks are split into chunks spread over the CPU cores (numpy releases the GIL inside its loops).

Bit-identity holds against a ggml whose compiler did not fuse multiply-adds (x86-64 builds: ggml-base,
where the quantizer lives, is compiled without -march flags, so without FMA; an aarch64 build may
contract and round differently). Inputs holding NaN are not reproduced.

Dequantization is gguf's: `gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np

QK_K = 256
SUB_BLOCK = 32
SUB_BLOCKS_PER_BLOCK = QK_K // SUB_BLOCK
BLOCK_BYTES = 2 + 2 + 12 + QK_K // 2

# make_qkx2_quants parameters as quantize_row_q4_K_ref passes them.
LEVEL_MAX = 15
SEARCH_RMIN = np.float32(-1.0)
SEARCH_RDELTA = np.float32(0.1)
SEARCH_STEPS = 20
SIX_BIT_MAX = np.float32(63.0)

# Adding 1.5 * 2**23 leaves the rounded integer in the low mantissa bits (ggml's nearest_int).
ROUNDING_MAGIC = np.float32(12582912.0)
MANTISSA_MASK = 0x007FFFFF
MANTISSA_OFFSET = 0x00400000

# Blocks per work item: (32, 8192) float32 workspace arrays of 1 MiB keep numpy's per-call overhead
# small next to the arithmetic (the fastest size tried, docs/decisions.md).
CHUNK_BLOCKS = 1024

ZERO = np.float32(0.0)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """Quantize float32 rows of shape (..., n), n a multiple of 256, to Q4_K bytes (..., n // 256 * 144)."""
    values = np.asarray(values)
    if values.dtype != np.float32:
        raise TypeError(f"Q4_K quantizes float32 values (ggml's input type), got {values.dtype}")
    if values.ndim == 0 or values.shape[-1] % QK_K:
        raise ValueError(f"the last dimension must be a multiple of {QK_K}, got shape {values.shape}")
    blocks = np.ascontiguousarray(values).reshape(-1, QK_K)
    packed = np.empty((blocks.shape[0], BLOCK_BYTES), dtype=np.uint8)
    chunk_starts = range(0, blocks.shape[0], CHUNK_BLOCKS)
    workers = max(1, min(len(chunk_starts), _usable_cpus()))

    def quantize_share(worker: int) -> None:
        workspace = _Workspace.allocate(min(CHUNK_BLOCKS, blocks.shape[0]) * SUB_BLOCKS_PER_BLOCK)
        for start in chunk_starts[worker::workers]:
            packed[start : start + CHUNK_BLOCKS] = _quantize_blocks(
                blocks[start : start + CHUNK_BLOCKS], workspace
            )

    if workers == 1:
        quantize_share(0)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(quantize_share, range(workers)))
    return packed.reshape(*values.shape[:-1], values.shape[-1] // QK_K * BLOCK_BYTES)


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class _Workspace:
    """(32, sub-blocks) float32 arrays reused chunk after chunk.

    Every operation writes into one of these: a fresh megabyte-sized temporary per numpy call costs
    more in page faults than the arithmetic itself.
    """

    x: np.ndarray
    weights: np.ndarray
    levels: np.ndarray
    weighted_levels: np.ndarray
    scratch: np.ndarray

    @classmethod
    def allocate(cls, n_sub_blocks: int) -> _Workspace:
        return cls(*(np.empty((SUB_BLOCK, n_sub_blocks), dtype=np.float32) for _ in fields(cls)))

    def first(self, n_sub_blocks: int) -> _Workspace:
        return _Workspace(*(getattr(self, field.name)[:, :n_sub_blocks] for field in fields(self)))


def _quantize_blocks(blocks: np.ndarray, workspace: _Workspace) -> np.ndarray:
    """quantize_row_q4_K_ref over (n_blocks, 256) float32 values, returning (n_blocks, 144) bytes."""
    n_blocks = blocks.shape[0]
    space = workspace.first(n_blocks * SUB_BLOCKS_PER_BLOCK)
    # One row per position inside a sub-block, one column per sub-block: ggml's loops over the 32
    # values become row-by-row numpy operations over all sub-blocks at once.
    np.copyto(space.x, blocks.reshape(-1, SUB_BLOCK).T)
    with np.errstate(all="ignore"):
        scales, mins = _make_qkx2_quants(space)
        scales = scales.reshape(n_blocks, SUB_BLOCKS_PER_BLOCK)
        mins = mins.reshape(n_blocks, SUB_BLOCKS_PER_BLOCK)

        # Starting from 0 and replacing only on ">" keeps the maxima +0 when nothing is positive.
        max_scale = np.where(scales > 0, scales, ZERO).max(axis=1)
        max_min = np.where(mins > 0, mins, ZERO).max(axis=1)
        scale_levels = _six_bit_levels(scales, max_scale)
        min_levels = _six_bit_levels(mins, max_min)
        d = (max_scale / SIX_BIT_MAX).astype("<f2")
        dmin = (max_min / SIX_BIT_MAX).astype("<f2")

        sub_scale = (d.astype(np.float32)[:, None] * scale_levels.astype(np.float32)).reshape(-1)
        sub_offset = (dmin.astype(np.float32)[:, None] * min_levels.astype(np.float32)).reshape(-1)
        scaled = np.add(space.x, sub_offset, out=space.scratch)
        scaled /= sub_scale
        _round_to_levels(scaled, out=space.weighted_levels)
        # ggml skips sub-blocks whose scale is 0, leaving the levels the search chose.
        np.copyto(space.levels, space.weighted_levels, where=sub_scale != 0)

    halves = space.levels.T.astype(np.uint8).reshape(n_blocks, QK_K // 64, 2, SUB_BLOCK)
    quants = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n_blocks, QK_K // 2)
    return np.concatenate(
        [
            d.reshape(n_blocks, 1).view(np.uint8),
            dmin.reshape(n_blocks, 1).view(np.uint8),
            _pack_scales(scale_levels, min_levels),
            quants,
        ],
        axis=1,
    )


def _make_qkx2_quants(space: _Workspace) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants(32, 15, ..., -1, 0.1, 20, false) for every column of space.x.

    Returns each sub-block's scale and its min as ggml stores it (negated, so >= 0), and leaves the
    levels the search settled on in space.levels.
    """
    x, weights, levels, scratch = space.x, space.weights, space.levels, space.scratch

    def quantize_levels(iscale: np.ndarray, minimum: np.ndarray) -> None:
        np.multiply(np.subtract(x, minimum, out=scratch), iscale, out=scratch)
        _round_to_levels(scratch, out=levels)

    def weighted_squared_error(scale: np.ndarray, minimum: np.ndarray) -> np.ndarray:
        # diff = scale * L + min - x, then w * diff², summed in order.
        diff = np.multiply(levels, scale, out=scratch)
        diff += minimum
        diff -= x
        diff *= diff
        diff *= weights
        return _sequential_sum(diff)

    np.multiply(x, x, out=scratch)
    av_x = np.sqrt(_sequential_sum(scratch) / np.float32(SUB_BLOCK))
    np.abs(x, out=weights)
    weights += av_x  # av_x + |x|: float addition commutes bit for bit, as do the products below
    sum_w = _sequential_sum(weights, from_zero=False)
    np.multiply(weights, x, out=scratch)
    sum_x = _sequential_sum(scratch, from_zero=False)
    # min and max are order-free apart from the sign of a zero min, which never reaches the output.
    lowest = np.minimum(x.min(axis=0), ZERO)
    highest = x.max(axis=0)
    flat = highest == lowest

    iscale = np.float32(LEVEL_MAX) / (highest - lowest)
    scale = np.float32(1.0) / iscale
    minimum = lowest
    quantize_levels(iscale, minimum)
    best_error = weighted_squared_error(scale, minimum)
    best_iscale, best_minimum = iscale, minimum

    for step in range(SEARCH_STEPS + 1):
        iscale = (SEARCH_RMIN + SEARCH_RDELTA * np.float32(step) + np.float32(LEVEL_MAX)) / (
            highest - minimum
        )
        quantize_levels(iscale, minimum)
        weighted_levels = np.multiply(weights, levels, out=space.weighted_levels)
        sum_l = _sequential_sum(weighted_levels)
        sum_l2 = _sequential_sum(np.multiply(weighted_levels, levels, out=scratch))
        sum_xl = _sequential_sum(np.multiply(weighted_levels, x, out=scratch))
        determinant = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / determinant
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / determinant
        positive_min = this_min > 0
        this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
        this_min = np.where(positive_min, ZERO, this_min)
        error = weighted_squared_error(this_scale, this_min)
        better = (determinant > 0) & (error < best_error)
        best_error = np.where(better, error, best_error)
        scale = np.where(better, this_scale, scale)
        # A step's levels are a function of its iscale and of the min it started from.
        best_iscale = np.where(better, iscale, best_iscale)
        best_minimum = np.where(better, minimum, best_minimum)
        minimum = np.where(better, this_min, minimum)

    quantize_levels(best_iscale, best_minimum)
    levels[:, flat] = ZERO
    scale = np.where(flat, ZERO, scale)
    minimum = np.where(flat, lowest, minimum)
    return scale, -minimum


def _sequential_sum(terms: np.ndarray, from_zero: bool = True) -> np.ndarray:
    """Add the rows of terms one after another in float32, as ggml's scalar loops do.

    from_zero mirrors `float s = 0; s += t[0]; ...`; otherwise the sum starts as `s = t[0]`.
    """
    total = np.zeros_like(terms[0]) if from_zero else terms[0].copy()
    for row in terms if from_zero else terms[1:]:
        total += row
    return total


def _nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (round half to even through the float32 mantissa), computed in place.

    values is overwritten; the result is the same memory reinterpreted as int32.
    """
    values += ROUNDING_MAGIC
    rounded = values.view(np.int32)
    rounded &= MANTISSA_MASK
    rounded -= MANTISSA_OFFSET
    return rounded


def _round_to_levels(scaled: np.ndarray, out: np.ndarray) -> None:
    """out = MAX(0, MIN(15, nearest_int(scaled))) as float32, the form ggml's sums multiply with."""
    rounded = _nearest_int(scaled)
    np.clip(rounded, 0, LEVEL_MAX, out=rounded)
    np.copyto(out, rounded, casting="unsafe")


def _six_bit_levels(values: np.ndarray, largest: np.ndarray) -> np.ndarray:
    """6-bit levels of per-sub-block scales or mins against the block's largest (uint8 wrap, then MIN 63)."""
    inverse = np.where(largest > 0, SIX_BIT_MAX / largest, ZERO)
    wrapped = (_nearest_int(inverse[:, None] * values) & 0xFF).astype(np.uint8)
    return np.minimum(wrapped, np.uint8(63))


def _pack_scales(scale_levels: np.ndarray, min_levels: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit (scale, min) pairs into 12 bytes: sub-blocks 4-7 spill their top 2 bits."""
    low_scales, high_scales = scale_levels[:, :4], scale_levels[:, 4:]
    low_mins, high_mins = min_levels[:, :4], min_levels[:, 4:]
    return np.concatenate(
        [
            low_scales | ((high_scales >> 4) << 6),
            low_mins | ((high_mins >> 4) << 6),
            (high_scales & 0x0F) | ((high_mins & 0x0F) << 4),
        ],
        axis=1,
    )
