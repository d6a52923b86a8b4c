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


class SafetensorsCheckpoint:
    """A `TensorReader` over one folder: each `read` loads a single tensor from its shard."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._shard_of: dict[str, Path] = {}
        shards = self._shard_files()
        self._handles = {}
        for shard in shards:
            try:
                handle = safe_open(str(shard), framework="pt")
            except (SafetensorError, OSError) as error:
                raise SafetensorsCheckpointError(
                    f"{shard}: not a readable safetensors file ({error})"
                ) from error
            self._handles[shard] = handle
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

    def read(self, name: str) -> torch.Tensor:
        return self._handles[self._shard_of[name]].get_tensor(name)
