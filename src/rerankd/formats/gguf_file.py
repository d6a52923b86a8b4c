"""Read any GGUF file: its architecture, metadata fields and tensors, and the variants a folder holds.

What the backends share whatever the model family: the fast reader, one set of metadata accessors (each
problem becomes a GGUFModelError naming the file), the tensors in torch orientation, and the architecture,
which decides the backend. gguf's GGUFReader parses arrays one element at a time, so a 128,001-token
vocabulary makes a plain open take 8-12 s on the development machine; hence the reader below, and the
architecture read from a file's first bytes where it can be.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, Keys, ReaderTensor
from gguf.quants import dequantize

from rerankd.formats.gguf_layout import QUANTIZED_TYPES, parse_variant_file_name

# Enough of a file's start for its header and a first key holding the architecture.
LEADING_BYTES = 256
# The header (magic, version, tensor count, key count) and the first key's length; a value's type and, for a
# string, its length.
_HEADER = struct.Struct("<4sIQQQ")
_STRING_VALUE = struct.Struct("<IQ")


class GGUFModelError(ValueError):
    """A GGUF file that cannot be served; the message names the file and the problem."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class _MappedGGUFReader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map instead of the np.memmap itself.

    GGUFReader parses array metadata one element at a time, and slicing an np.memmap costs several
    times what slicing an ndarray does: a 128,001-token vocabulary takes 10-15 s to open through the
    memmap and 3-5 s through the view. The view still reads the file lazily through the same map.
    """

    @property  # type: ignore[override]  # an ndarray view where GGUFReader declares its memmap
    def data(self) -> np.ndarray:
        return self._mapped

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._mapped = value.view(np.ndarray)
        self.file_map: mmap.mmap | None = value.base if isinstance(value.base, mmap.mmap) else None


class GGUFTensors:
    """A `TensorReader` over the file's tensors, by GGUF name, in torch orientation (ggml's reversed).

    F32, F16 and BF16 come back in their stored dtype, Q8_0 and Q4_K dequantized to float32.
    """

    def __init__(self, tensors: Mapping[str, ReaderTensor], file_map: mmap.mmap | None = None) -> None:
        self._tensors = dict(tensors)
        self._file_map = file_map

    def names(self) -> Iterable[str]:
        return self._tensors.keys()

    def read(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        shape = torch_shape(tensor)
        if tensor.tensor_type == GGMLQuantizationType.BF16:
            # Copied out of the read-only map; bfloat16 has no numpy dtype, so its bits go through int16.
            values = torch.from_numpy(np.array(tensor.data).view(np.int16)).view(torch.bfloat16)
        elif tensor.tensor_type in QUANTIZED_TYPES:
            values = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type))
        else:
            values = torch.from_numpy(np.array(tensor.data))
        self._release(tensor)
        return values.reshape(shape)

    def _release(self, tensor: ReaderTensor) -> None:
        """Drop the tensor's pages of the memory map once copied out: mapped pages stay resident (and count
        in RSS) until unmapped, so without this a load peaks at the whole file plus the converted weights."""
        if self._file_map is None:
            return
        start = tensor.data_offset - tensor.data_offset % mmap.PAGESIZE
        self._file_map.madvise(mmap.MADV_DONTNEED, start, tensor.data_offset + tensor.n_bytes - start)

    def types(self) -> dict[str, str]:
        """Stored type of each tensor, e.g. {'classifier.weight': 'Q8_0'}."""
        return {name: tensor.tensor_type.name for name, tensor in self._tensors.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Torch-order shape of each tensor."""
        return {name: torch_shape(tensor) for name, tensor in self._tensors.items()}


def read_gguf(path: Path) -> GGUFReader:
    """The file's metadata and tensor index, through the fast reader; GGUFModelError when unreadable."""
    if not path.is_file():
        raise GGUFModelError(path, "is not a file" if path.exists() else "no such file")
    try:
        reader = _MappedGGUFReader(path)
    # GGUFReader reports bad magic, versions, types, duplicate keys and short reads as ValueError,
    # KeyError, IndexError, OverflowError or numpy errors (a truncated file fails to reshape its last
    # tensors): any of them means an unreadable file.
    except Exception as error:
        raise GGUFModelError(path, f"not a readable GGUF file ({type(error).__name__}: {error})") from error
    return reader


def gguf_architecture(path: Path) -> str:
    """`general.architecture`, which decides the backend that then reads the file. gguf's writer (which
    llama.cpp's converters use) and Antfly's exporter store it as the first key, so it is read from the file's
    first bytes; parsing the whole file first would cost 3 s for a DeBERTa-v3 vocabulary. Any other file is
    parsed."""
    try:
        with path.open("rb") as file:
            head = file.read(LEADING_BYTES)
    except OSError:
        head = b""  # read_gguf names the problem
    leading = _leading_architecture(head)
    if leading is not None:
        return leading
    return metadata_string(path, read_gguf(path), Keys.General.ARCHITECTURE)


def _leading_architecture(head: bytes) -> str | None:
    """The architecture when a little-endian GGUF v2/v3 file's first key holds it; None for anything else."""
    try:
        magic, version, _tensors, _keys, key_length = _HEADER.unpack_from(head)
        if magic != b"GGUF" or version not in (2, 3):
            return None
        key_end = _HEADER.size + key_length
        if key_end + _STRING_VALUE.size > len(head):
            return None
        value_type, value_length = _STRING_VALUE.unpack_from(head, key_end)
        key = head[_HEADER.size : key_end]
        if key != Keys.General.ARCHITECTURE.encode() or value_type != GGUFValueType.STRING:
            return None
        value = head[key_end + _STRING_VALUE.size : key_end + _STRING_VALUE.size + value_length]
        return value.decode() if len(value) == value_length else None
    except (struct.error, UnicodeDecodeError):
        return None


def find_gguf_variants(folder: Path) -> dict[str, Path]:
    """The folder's `<model>.<TYPE>.gguf` files keyed by TYPE (Q8_0, Q4_K, F16, F32)."""
    variants: dict[str, Path] = {}
    for candidate in sorted(folder.glob("*.gguf")):
        parsed = parse_variant_file_name(candidate.name)
        if parsed is None:
            continue
        file_type = parsed[1]
        if file_type in variants:
            raise GGUFModelError(
                candidate, f"{folder} already has a {file_type} variant, {variants[file_type].name}"
            )
        variants[file_type] = candidate
    return variants


def metadata_value(path: Path, reader: GGUFReader, key: str) -> Any:
    """The value stored under `key`; a missing key or a string that is not UTF-8 is a GGUFModelError."""
    field = reader.get_field(key)
    if field is None:
        raise GGUFModelError(path, f"required metadata key {key!r} is missing")
    try:
        return field.contents()
    except UnicodeDecodeError as error:
        raise GGUFModelError(path, f"metadata {key!r} holds a string that is not UTF-8 ({error})") from error


def metadata_string(path: Path, reader: GGUFReader, key: str) -> str:
    """The string under `key`; any other value is a GGUFModelError."""
    value = metadata_value(path, reader, key)
    if not isinstance(value, str):
        raise GGUFModelError(path, f"metadata {key!r} is {value!r}, expected a string")
    return value


def metadata_integer(path: Path, reader: GGUFReader, key: str, default: int | None = None) -> int:
    """The integer under `key`; `default` where the file has no such key, when one is given."""
    if default is not None and reader.get_field(key) is None:
        return default
    value = metadata_value(path, reader, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFModelError(path, f"metadata {key!r} is {value!r}, expected an integer")
    return value


def metadata_number(path: Path, reader: GGUFReader, key: str) -> float:
    """The integer or float under `key`, as a float (a bool is not a number here)."""
    value = metadata_value(path, reader, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GGUFModelError(path, f"metadata {key!r} is {value!r}, expected a number")
    return float(value)


def metadata_array(path: Path, reader: GGUFReader, key: str, item_type: type) -> list[Any]:
    """The array under `key`, every item an `item_type`."""
    value = metadata_value(path, reader, key)
    if not isinstance(value, list) or not all(isinstance(item, item_type) for item in value):
        raise GGUFModelError(path, f"metadata {key!r} is not an array of {item_type.__name__}")
    return value


def torch_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """The tensor's shape in torch order: ggml lists dimensions innermost first."""
    return tuple(int(dimension) for dimension in reversed(tensor.shape.tolist()))
