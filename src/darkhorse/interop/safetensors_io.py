"""Safetensors I/O for interop: a directory's tensors read one at a time.

The directory follows transformers' layout: one `model.safetensors`, or shards named by a
`model.safetensors.index.json` weight map.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from darkhorse.errors import DarkhorseError

INDEX_FILE = "model.safetensors.index.json"


def _open_unmapped(path: Path):
    """A safetensors handle that reads with pread: with mmap every page read stays mapped into the
    process until the handle closes, so a conversion's RSS would hold the source file besides the model."""
    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.8 has only mmap
        return safe_open(str(path), framework="pt")


class SafetensorsDir:
    """The tensors of a directory (one `.safetensors` file, or shards with an index), read on demand."""

    def __init__(self, path: str | Path, single_file: str = "model.safetensors") -> None:
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DarkhorseError(f"{index}: not a safetensors index (no 'weight_map')") from None
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
            if not (self.path / file).exists():
                raise DarkhorseError(f"{self.path / file}: listed in {INDEX_FILE} but missing")
            handle = _open_unmapped(self.path / file)
            self._handles[file] = handle
            self._file_of.update(dict.fromkeys(handle.keys(), file))

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._file_of[name]].get_tensor(name)
