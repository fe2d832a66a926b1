"""Safetensors I/O for interop: a directory's tensors read one at a time, and shards written as they fill.

Both follow transformers' layout: one `model.safetensors`, or `model-0000k-of-0000n.safetensors`
shards named by a `model.safetensors.index.json` weight map.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from darkhorse.checkpoint import open_safetensors, write_safetensors
from darkhorse.errors import DarkhorseError, parsing
from darkhorse.files import contained, read_json_object

INDEX_FILE = "model.safetensors.index.json"


class SafetensorsDir:
    """The tensors of a directory (one `.safetensors` file, or shards with an index), read on demand."""

    def __init__(self, path: str | Path, single_file: str = "model.safetensors") -> None:
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.exists():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise DarkhorseError(f"{index}: not a safetensors index (no 'weight_map' of tensor -> file name)")
            files = sorted(set(weight_map.values()))
        elif (self.path / single_file).exists():
            files = [single_file]
        else:
            found = ", ".join(sorted(p.name for p in self.path.glob("*.bin"))) or "none"
            raise DarkhorseError(
                f"{self.path}: no {single_file} or {INDEX_FILE} (other weight files: {found}); "
                "only safetensors weights are read (re-save with save_pretrained(safe_serialization=True))"
            )
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for file in files:
            path = contained(self.path, file, index)  # a weight_map entry may not reach outside the dir
            if not path.exists():
                raise DarkhorseError(f"{path}: listed in {INDEX_FILE} but missing")
            handle = open_safetensors(path)
            self._handles[file] = handle
            self._file_of.update(dict.fromkeys(handle.keys(), file))

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._file_of[name]
        with parsing(self.path / file, "safetensors file", SafetensorError):
            return tuple(self._handles[file].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        file = self._file_of[name]
        with parsing(self.path / file, "safetensors file", SafetensorError):
            return self._handles[file].get_tensor(name)


class ShardWriter:
    """Safetensors shards written as they fill, named and indexed the way transformers expects."""

    def __init__(self, folder: Path, max_bytes: int, stem: str = "model") -> None:
        self.folder, self.max_bytes, self.stem = folder, max_bytes, stem
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in shard for shard in self.shards):
            raise DarkhorseError(f"internal error: tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor  # views and shared storage are fine: bytes are written per tensor
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        index = len(self.shards) + 1
        write_safetensors(self.folder / f"{self.stem}-{index:05d}.safetensors", list(self.pending.items()),
                          {"format": "pt"})  # fmt: skip
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give the shards their final names, write the index if sharded."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            final = self.folder / f"{self.stem}.safetensors"
            (self.folder / f"{self.stem}-00001.safetensors").rename(final)
            return [final]
        weight_map, files = {}, []
        for index, names in enumerate(self.shards, start=1):
            final = self.folder / f"{self.stem}-{index:05d}-of-{count:05d}.safetensors"
            (self.folder / f"{self.stem}-{index:05d}.safetensors").rename(final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index_data = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index_data, indent=2) + "\n")
        return files
