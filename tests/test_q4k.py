"""Q4_K quantization: our numpy bytes against ggml's own (through llama-cpp-python's libggml), plus a
round trip through gguf's dequantizer that needs no ggml at all."""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from rerankd.formats.q4k import BLOCK_BYTES, QK_K, quantize_q4_k

GGML_TYPE_Q4_K = 12


def _find_libggml() -> ctypes.CDLL | None:
    """The libggml inside an installed llama_cpp package that exports ggml_quantize_chunk, if any."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidates = sorted(
        path for folder in spec.submodule_search_locations for path in Path(folder).rglob("libggml*.so*")
    )
    for path in candidates:
        try:
            library = ctypes.CDLL(str(path))
        except OSError:
            continue
        if hasattr(library, "ggml_quantize_chunk") and hasattr(library, "dequantize_row_q4_K"):
            library.ggml_quantize_chunk.restype = ctypes.c_size_t
            library.ggml_quantize_chunk.argtypes = [
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_int64,
                ctypes.c_void_p,
            ]
            library.dequantize_row_q4_K.restype = None
            library.dequantize_row_q4_K.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            return library
    return None


@pytest.fixture(scope="module")
def libggml() -> ctypes.CDLL:
    library = _find_libggml()
    if library is None:
        pytest.skip("no libggml found: install llama-cpp-python to compare against ggml's Q4_K quantizer")
    return library


def ggml_quantize(library: ctypes.CDLL, values: np.ndarray) -> np.ndarray:
    """ggml_quantize_chunk with no imatrix, which runs quantize_row_q4_K_ref."""
    rows = np.ascontiguousarray(values, dtype=np.float32).reshape(-1, values.shape[-1])
    out = np.zeros((rows.shape[0], rows.shape[1] // QK_K * BLOCK_BYTES), dtype=np.uint8)
    written = library.ggml_quantize_chunk(
        GGML_TYPE_Q4_K, rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None
    )
    assert written == out.size
    return out.reshape(*values.shape[:-1], -1)


def ggml_dequantize(library: ctypes.CDLL, packed: np.ndarray) -> np.ndarray:
    blocks = np.ascontiguousarray(packed).reshape(-1, BLOCK_BYTES)
    out = np.empty((blocks.shape[0], QK_K), dtype=np.float32)
    library.dequantize_row_q4_K(blocks.ctypes.data, out.ctypes.data, out.size)
    return out


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _with_outliers(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    values = _normal(rng, shape) * np.float32(0.02)
    outliers = rng.random(shape) < 0.01
    values[outliers] *= np.float32(300.0)
    return values


def _some_zero_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    values = _normal(rng, shape)
    values[..., ::3, :] = 0.0
    return values


def _constant_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    constants = rng.choice(np.array([-2.5, -1e-3, 0.0, 1e-3, 0.75, 3.0], dtype=np.float32), shape[:-1])
    return np.broadcast_to(constants[..., None], shape).copy()


def _one_huge_value(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    values = _normal(rng, shape)
    rows = values.reshape(-1, shape[-1])
    rows[np.arange(rows.shape[0]), rng.integers(0, shape[-1], rows.shape[0])] = rng.choice(
        np.array([1e4, -1e4, 6e4, -3e5], dtype=np.float32), rows.shape[0]
    )
    return values


def _tiny_and_subnormal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Per row scales from normal-but-small down to subnormal, where x² underflows to 0.
    exponents = rng.choice(np.array([-20, -25, -30, -38, -41, -44], dtype=np.float32), shape[:-1])
    return _normal(rng, shape) * np.power(np.float32(10.0), exponents)[..., None]


def _overflowing(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Magnitudes whose squares and weighted sums overflow float32 to inf.
    exponents = rng.choice(np.array([19, 25, 37], dtype=np.float32), shape[:-1])
    return _normal(rng, shape) * np.power(np.float32(10.0), exponents)[..., None]


def _negative_only(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return -np.abs(_normal(rng, shape)) - np.float32(0.5)


def _positive_only(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.abs(_normal(rng, shape)) + np.float32(0.5)


def _uneven_sub_blocks(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Sub-blocks whose range is far below the block's largest get a 6-bit scale of 0, where ggml keeps
    # the levels of the search instead of re-quantizing.
    exponents = rng.integers(-6, 2, (*shape[:-1], shape[-1] // 32)).astype(np.float32)
    scales = np.repeat(np.power(np.float32(10.0), exponents), 32, axis=-1)
    return _normal(rng, shape) * scales + rng.standard_normal(scales.shape, dtype=np.float32) * scales


def _sparse(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return np.where(rng.random(shape) < 0.05, _normal(rng, shape), np.float32(0.0)).astype(np.float32)


def _rounding_ties(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    # Values on a coarse grid hit exact .5 cases in the rounding.
    return rng.integers(-16, 16, shape).astype(np.float32) * np.float32(0.25)


def _uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


GENERATORS: dict[str, Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]] = {
    "normal": _normal,
    "uniform": _uniform,
    "outliers": _with_outliers,
    "zero-rows": _some_zero_rows,
    "constant-rows": _constant_rows,
    "one-huge-value": _one_huge_value,
    "tiny-and-subnormal": _tiny_and_subnormal,
    "overflowing": _overflowing,
    "negative-only": _negative_only,
    "positive-only": _positive_only,
    "uneven-sub-blocks": _uneven_sub_blocks,
    "sparse": _sparse,
    "rounding-ties": _rounding_ties,
}
SHAPES = [(1, 256), (7, 512), (3, 768 * 4), (64, 3072)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("kind", GENERATORS)
def test_bytes_match_ggml(libggml: ctypes.CDLL, kind: str, shape: tuple[int, ...]) -> None:
    values = GENERATORS[kind](np.random.default_rng(sum(map(ord, kind)) + shape[0]), shape)
    ours = quantize_q4_k(values)
    expected = ggml_quantize(libggml, values)
    mismatched_blocks = np.flatnonzero(
        (ours.reshape(-1, BLOCK_BYTES) != expected.reshape(-1, BLOCK_BYTES)).any(1)
    )
    assert mismatched_blocks.size == 0, (
        f"{mismatched_blocks.size} blocks differ, first {mismatched_blocks[:5]}"
    )


def test_bytes_match_ggml_across_chunks_and_leading_dims(libggml: ctypes.CDLL) -> None:
    """Enough blocks to be split over several worker chunks, in a 3-D array."""
    values = _with_outliers(np.random.default_rng(7), (4, 300, 1024))
    ours = quantize_q4_k(values)
    assert ours.shape == (4, 300, 4 * BLOCK_BYTES)
    np.testing.assert_array_equal(ours, ggml_quantize(libggml, values))


def test_gguf_dequantizes_like_ggml(libggml: ctypes.CDLL) -> None:
    """Our dequantizer is gguf's: on our bytes it must give ggml's floats bit for bit."""
    values = _uneven_sub_blocks(np.random.default_rng(3), (16, 2048))
    ours = quantize_q4_k(values)
    from_gguf = dequantize(ours, GGMLQuantizationType.Q4_K)
    np.testing.assert_array_equal(from_gguf.reshape(-1, QK_K), ggml_dequantize(libggml, ours))
    np.testing.assert_array_equal(
        from_gguf, dequantize(ggml_quantize(libggml, values), GGMLQuantizationType.Q4_K)
    )


@pytest.mark.parametrize("kind", ["normal", "uniform", "outliers", "negative-only", "positive-only"])
def test_round_trip_error_is_small(kind: str) -> None:
    values = GENERATORS[kind](np.random.default_rng(11), (32, 1024))
    restored = dequantize(quantize_q4_k(values), GGMLQuantizationType.Q4_K)
    assert restored.shape == values.shape and restored.dtype == np.float32
    blocks, restored_blocks = values.reshape(-1, QK_K), restored.reshape(-1, QK_K)
    # 4-bit levels over each sub-block's range (min clipped at 0) plus 6-bit scales: a tenth of the
    # block's span is a generous bound, an order of magnitude above a typical error.
    span = blocks.max(axis=1) - np.minimum(blocks.min(axis=1), 0)
    error = np.abs(restored_blocks - blocks).max(axis=1)
    assert (error <= span / 10).all()
    assert np.abs(restored_blocks - blocks).mean() < (span / 60).mean()


def test_zero_block_round_trips_exactly_and_constant_block_closely() -> None:
    values = np.zeros((2, 256), dtype=np.float32)
    values[1] = -1.5
    restored = dequantize(quantize_q4_k(values), GGMLQuantizationType.Q4_K)
    np.testing.assert_array_equal(restored[0], values[0])
    # A constant block is all min: 1.5 through a float16 dmin of 1.5/63 times 63.
    np.testing.assert_allclose(restored[1], values[1], rtol=1e-3)


def test_rejects_non_float32_and_ragged_rows() -> None:
    with pytest.raises(TypeError, match="float32"):
        quantize_q4_k(np.zeros((1, 256), dtype=np.float64))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q4_k(np.zeros((1, 300), dtype=np.float32))
