"""Read Hugging Face safetensors checkpoints (single file or sharded with an index), lazily by tensor name."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsCheckpointError(ValueError):
    """The folder's safetensors files are missing, unreadable or inconsistent with their index."""


def has_safetensors(folder: Path) -> bool:
    return (
        (folder / SINGLE_FILE).is_file()
        or (folder / INDEX_FILE).is_file()
        or any(folder.glob("*.safetensors"))
    )


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_header(shard: Path) -> tuple[int, dict[str, dict]]:
    """Where the data starts and each tensor's entry (dtype, shape, data_offsets), from the file's header."""
    with shard.open("rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


class SafetensorsCheckpoint:
    """A `TensorReader` over one folder: each `read` loads a single tensor from its shard."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._shard_of: dict[str, Path] = {}
        shards = self._shard_files()
        self._handles = {}
        self._data_starts: dict[Path, int] = {}
        self._layouts: dict[Path, dict[str, dict]] = {}
        for shard in shards:
            try:
                handle = safe_open(str(shard), framework="pt")
            except (SafetensorError, OSError) as error:
                raise SafetensorsCheckpointError(
                    f"{shard}: not a readable safetensors file ({error})"
                ) from error
            self._handles[shard] = handle
            self._data_starts[shard], self._layouts[shard] = _read_header(shard)
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                self._shard_of.setdefault(name, shard)

    def _shard_files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise SafetensorsCheckpointError(f"{index}: invalid index ({error})") from error
            shards = sorted({self.folder / name for name in weight_map.values()})
            missing = [str(shard) for shard in shards if not shard.is_file()]
            if missing:
                raise SafetensorsCheckpointError(f"{index} names shards that are missing: {missing}")
            return shards
        if (self.folder / SINGLE_FILE).is_file():
            return [self.folder / SINGLE_FILE]
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            raise SafetensorsCheckpointError(f"{self.folder}: no model.safetensors or *.safetensors shards")
        return shards

    def names(self) -> Iterable[str]:
        return self._shard_of.keys()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape, from the headers alone (as `GGUFTensors.shapes`): no tensor is read."""
        return {name: tuple(self._layouts[shard][name]["shape"]) for name, shard in self._shard_of.items()}

    def read(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype, read with plain file reads into memory of its own.

        Not through the memory map: pages of a mapping stay resident (and count in RSS) until it is closed,
        so a mapped load peaks at the whole file plus the converted weights.
        """
        shard = self._shard_of[name]
        entry = self._layouts[shard][name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with shard.open("rb", buffering=0) as file:
            file.seek(self._data_starts[shard] + begin)
            if file.readinto(buffer) != len(buffer):
                raise SafetensorsCheckpointError(f"{shard}: truncated data for tensor {name}")
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SafetensorsCheckpointError(f"{shard}: tensor {name} has unsupported dtype {entry['dtype']}")
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])
