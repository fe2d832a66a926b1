"""The prepared-data directory: the one format that `prepare` writes and `train` reads.

    DIR/tokenizer.json        HF `tokenizers` file
    DIR/train.bin, val.bin    flat little-endian uint32 token ids
    DIR/train.domains.bin ... one uint8 domain id per token (optional)
    DIR/train.mask.bin ...    one uint8 per token: 1 = trained on, 0 = context only (optional; "loss_mask")
    DIR/meta.json             {"format", "vocab_size", "tokenizer_sha256", "domains": [names], "loss_mask",
                               "splits": {"train": {"tokens", "documents", "bytes", "loss_tokens",
                                                    "domains": {...}}, ...},
                               "inputs": [{"path", "sha256", "bytes"}],
                               "special_tokens": {token: id}, "bos_id", "eos_id", "pad_id",
                               "skipped": [{"path", "count", "examples"}], "settings": {...}}

`tokenizer_sha256` is the sha256 of tokenizer.json's bytes (= `Tokenizer.sha256`); sources mixed in one
run must share it. Domain ids index `domains`; untagged records are "general".

The loss mask marks the tokens a model learns to produce: in a chat record the assistant's part (see
`chat_format.assistant_spans`), in plain text every token. `loss_tokens` counts the 1s; a token whose
mask is 0 is still seen as context, it just is not a prediction target.

Opening a directory checks it against its meta.json so that a truncated or mismatched file is a
clear error before training starts, not a crash (or silent garbage) mid-run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from darkhorse.errors import DarkhorseError
from darkhorse.files import check_fields, read_json_object

FORMAT_NAME = "darkhorse-prepared"  # every version's format starts with it
FORMAT = f"{FORMAT_NAME}-v1"
META_TYPES = {
    "format": str, "vocab_size": int, "tokenizer_sha256": str, "domains": list, "loss_mask": bool, "splits": dict,
    "special_tokens": dict, "bos_id": int, "eos_id": int, "pad_id": int,
}  # fmt: skip
SPLIT_TYPES = {"tokens": int, "documents": int, "bytes": int, "loss_tokens": int, "domains": dict}
TOKEN_DTYPE = np.dtype("<u4")
DOMAIN_DTYPE = np.dtype("u1")
MASK_DTYPE = np.dtype("u1")
SPLITS = ("train", "val")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class PreparedData:
    """A validated prepared directory with memory-mapped token (and domain) arrays."""

    path: Path
    meta: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def domain_names(self) -> list[str]:
        return list(self.meta.get("domains", []))

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.meta.get("tokenizer_sha256", ""))

    def split_info(self, split: str) -> dict[str, Any]:
        return dict(self.meta.get("splits", {}).get(split, {}))

    def bytes_per_token(self, split: str) -> float | None:
        """UTF-8 bytes of source text per token, for bits-per-byte; None when unknown."""
        info = self.split_info(split)
        if info.get("bytes") and info.get("tokens"):
            return info["bytes"] / info["tokens"]
        return None

    def tokens(self, split: str) -> np.ndarray:
        return self._maps[split][0]

    def domains(self, split: str) -> np.ndarray | None:
        return self._maps[split][1]

    def loss_mask(self, split: str) -> np.ndarray | None:
        """1 where a token is a training target, 0 where it is context only; None when all tokens count."""
        return self._maps[split][2]

    def document_starts(self, split: str) -> np.ndarray | None:
        """Sorted positions of the split's BOS tokens (where each document or chat record begins);
        None when the tokenizer has no BOS."""
        bos = self.meta.get("bos_id")
        if bos is None:
            return None
        if split not in self._starts:
            self._starts[split] = np.flatnonzero(self.tokens(split) == bos)
        return self._starts[split]

    @cached_property
    def _starts(self) -> dict[str, np.ndarray]:
        return {}

    @cached_property
    def _maps(self) -> dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
        maps = {}
        for split in SPLITS:
            token_file = self.path / f"{split}.bin"
            if not token_file.exists():
                continue
            domain_file, mask_file = self.path / f"{split}.domains.bin", self.path / f"{split}.mask.bin"
            domains = _map(domain_file, DOMAIN_DTYPE) if domain_file.exists() else None
            mask = _map(mask_file, MASK_DTYPE) if mask_file.exists() else None
            maps[split] = (_map(token_file, TOKEN_DTYPE), domains, mask)
        return maps


def _map(path: Path, dtype: np.dtype) -> np.ndarray:
    """Read-only memory map; an empty file (e.g. val.bin with --val-fraction 0) is an empty array."""
    if path.stat().st_size == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _largest(path: Path, dtype: np.dtype, chunk: int = 1 << 20) -> int:
    """Largest value in a flat binary file (-1 if empty), read in chunks: scanning a memmap instead would
    leave the whole file resident, so peak memory would grow with the corpus."""
    largest = -1
    with open(path, "rb") as handle:
        while (block := np.fromfile(handle, dtype=dtype, count=chunk)).size:
            largest = max(largest, int(block.max()))
    return largest


def looks_prepared(path: Path) -> bool:
    """Whether `path` is a dir `prepare` wrote (its meta.json names our format), so --force may replace
    it; anything else might hold a user's files. Damage inside does not matter: it is being replaced."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "vocab_size" in meta and str(meta.get("format", FORMAT)).startswith(FORMAT_NAME)


def _fail(path: Path, message: str) -> DarkhorseError:
    return DarkhorseError(f"{path}: {message}")


def open_prepared(path: str | Path, check_ids: bool = True) -> PreparedData:
    """Open and validate a prepared directory (sizes, counts, and optionally token-id range)."""
    path = Path(path)
    if not path.is_dir():
        raise DarkhorseError(f"prepared data directory not found: {path} (create one with `darkhorse prepare`)")
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise _fail(path, "no meta.json: this is not a prepared data directory (see `darkhorse prepare`)")
    meta = read_json_object(meta_file)
    check_fields(meta_file, meta, META_TYPES, nullable=("bos_id",))
    for split, info in meta.get("splits", {}).items():
        check_fields(f"{meta_file} (splits.{split})", info, SPLIT_TYPES, nullable=())
    if "vocab_size" not in meta:
        raise _fail(meta_file, "missing 'vocab_size'")
    if meta.get("format", FORMAT) != FORMAT:
        raise _fail(meta_file, f"format {meta['format']!r} is not {FORMAT!r}; prepare the data again")
    if not (path / "train.bin").exists():
        raise _fail(path, "missing train.bin")
    for split in meta.get("splits", {}):
        if split in SPLITS and not (path / f"{split}.bin").exists():
            raise _fail(path, f"meta.json lists the {split} split but {split}.bin is missing")
    tokenizer_file = path / "tokenizer.json"
    expected_sha = meta.get("tokenizer_sha256")
    if expected_sha and tokenizer_file.exists() and sha256_file(tokenizer_file) != expected_sha:
        raise _fail(tokenizer_file, "does not match tokenizer_sha256 in meta.json (replaced or edited?)")
    for split in SPLITS:
        token_file = path / f"{split}.bin"
        if not token_file.exists():
            continue
        size = token_file.stat().st_size
        if size % TOKEN_DTYPE.itemsize:
            raise _fail(token_file, f"size {size} is not a multiple of 4 (truncated uint32 token file?)")
        count = size // TOKEN_DTYPE.itemsize
        expected = meta.get("splits", {}).get(split, {}).get("tokens")
        if expected is not None and expected != count:
            raise _fail(token_file, f"holds {count} tokens but meta.json says {expected}")
        domain_file, mask_file = path / f"{split}.domains.bin", path / f"{split}.mask.bin"
        if domain_file.exists() and domain_file.stat().st_size != count:
            raise _fail(domain_file, f"holds {domain_file.stat().st_size} domain ids for {count} tokens")
        if meta.get("loss_mask") and not mask_file.exists():
            raise _fail(path, f"meta.json says loss_mask but {mask_file.name} is missing")
        if mask_file.exists() and mask_file.stat().st_size != count:
            raise _fail(mask_file, f"holds {mask_file.stat().st_size} loss-mask entries for {count} tokens")
    data = PreparedData(path=path, meta=meta)
    if check_ids:
        for split in SPLITS:
            token_file, domain_file = path / f"{split}.bin", path / f"{split}.domains.bin"
            if token_file.exists() and (largest := _largest(token_file, TOKEN_DTYPE)) >= data.vocab_size:
                raise _fail(token_file, f"token id {largest} >= vocab size {data.vocab_size} in meta.json")
            names = data.domain_names
            if domain_file.exists() and names and (largest := _largest(domain_file, DOMAIN_DTYPE)) >= len(names):
                raise _fail(domain_file, f"domain id {largest} but meta.json names only {len(names)} domains")
            mask_file = path / f"{split}.mask.bin"
            if mask_file.exists() and (largest := _largest(mask_file, MASK_DTYPE)) > 1:
                raise _fail(mask_file, f"holds the value {largest}; a loss mask is 0 or 1 per token")
    if len(data.tokens("train")) < 2:
        raise _fail(path, "train.bin holds fewer than 2 tokens")
    return data
