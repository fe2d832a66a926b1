"""The one checkpoint format: what `train` writes and generate, chat, eval and export read.

    RUN_DIR/step-000123/ and RUN_DIR/final/, each holding
        model.safetensors   weights (a tied embedding/head stored once)
        meta.json           {"config", "step", "tokens_seen", "loss", "darkhorse_version", ...}
        tokenizer.json      copied from the prepared data dir (with a foreign tokenizer's
                            tokenizer_config.json / chat_template.jinja when it has them)
        trainer_state.pt    optimizer, scheduler, scaler, RNG and data position (training only)

A checkpoint is written into a hidden temp dir next to its target, fsynced, then renamed into
place, so a crash mid-save leaves the previous checkpoints intact and no half-written directory
under a valid name. Nothing is ever unpickled: weights come from safetensors and the trainer
state through `torch.load(weights_only=True)`.

Weights are written by `write_safetensors`, which streams one tensor at a time into the file
(safetensors' own `save_file` first serialises every tensor into one bytes object, a second copy of
the model), so saving a model costs no memory beyond the model itself.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model as load_safetensors_into
from torch import nn

from darkhorse import __version__
from darkhorse.config import RunConfig, run_config_from_dict
from darkhorse.data.tokenizer import SIDECAR_FILES
from darkhorse.errors import DarkhorseError

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.pt"
FINAL_NAME = "final"
STEP_PREFIX = "step-"
TEMP_PREFIX = ".tmp-"


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(temp_dir)`, then move the finished dir to `target` (replacing an old one)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f"{TEMP_PREFIX}{target.name}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        write(temp)
        for file in temp.iterdir():
            _fsync(file)
        _fsync(temp)
        if target.exists():
            retired = target.parent / f"{TEMP_PREFIX}old-{target.name}-{os.getpid()}"
            target.rename(retired)
            temp.rename(target)
            shutil.rmtree(retired)
        else:
            temp.rename(target)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target


def remove_stale_temp_dirs(run_dir: Path) -> None:
    """Temp dirs left by a save that was killed; they never hold a checkpoint anyone can use."""
    for stale in Path(run_dir).glob(f"{TEMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(
    path: str | Path, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> None:
    """Write `tensors` in the safetensors layout, one tensor's bytes at a time.

    The layout: an 8-byte little-endian header length, a JSON header (dtype, shape and byte range of
    each tensor in the data block, plus `__metadata__`) padded with spaces to 8 bytes, then the data.
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise DarkhorseError(f"cannot write {name}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}  # fmt: skip
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for _, tensor in tensors:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            handle.write(memoryview(flat.view(torch.uint8).numpy()))


def unique_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The persistent tensors of `model`, a tensor shared under several names (tied embedding and
    head) once, under its alphabetically first name as safetensors' `save_model` keeps it."""
    kept: dict[object, tuple[str, torch.Tensor]] = {}
    for name, tensor in sorted(model.state_dict().items()):
        shared_key = (tensor.data_ptr(), tuple(tensor.shape)) if tensor.numel() else name
        kept.setdefault(shared_key, (name, tensor))
    return list(kept.values())


def _write_model_files(
    folder: Path, model: nn.Module, config: RunConfig, tokenizer_file: Path | None, meta: dict[str, Any]
) -> None:
    write_safetensors(folder / MODEL_FILE, unique_state(model), {"format": "pt"})
    record = {**meta, "config": config.to_dict(), "darkhorse_version": __version__}  # the model saved decides
    (folder / META_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if tokenizer_file is not None and Path(tokenizer_file).exists():
        shutil.copyfile(tokenizer_file, folder / TOKENIZER_FILE)
        if Path(tokenizer_file).name == TOKENIZER_FILE:  # a foreign tokenizer's settings travel with it
            for name in SIDECAR_FILES:
                if Path(tokenizer_file).with_name(name).is_file():
                    shutil.copyfile(Path(tokenizer_file).with_name(name), folder / name)


def save_model_checkpoint(
    folder: str | Path, model: nn.Module, config: RunConfig, tokenizer_file: Path | None, meta: dict[str, Any]
) -> Path:
    """Weights, meta and tokenizer without trainer state (e.g. an imported model).

    Replaces `folder` if it exists: callers decide whether that is allowed (--force).
    """
    return write_atomically(Path(folder), lambda temp: _write_model_files(temp, model, config, tokenizer_file, meta))


def save_training_checkpoint(
    folder: Path,
    model: nn.Module,
    config: RunConfig,
    tokenizer_file: Path | None,
    meta: dict[str, Any],
    trainer_state: dict[str, Any],
) -> Path:
    """A resumable checkpoint: the model files plus `trainer_state.pt`."""

    def write(temp: Path) -> None:
        _write_model_files(temp, model, config, tokenizer_file, meta)
        torch.save(trainer_state, temp / STATE_FILE)

    return write_atomically(folder, write)


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DarkhorseError(f"checkpoint directory not found: {folder}")
    meta_file = folder / META_FILE
    if not meta_file.exists():
        raise DarkhorseError(f"{folder} is not a darkhorse checkpoint (no {META_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise DarkhorseError(f"{meta_file}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise DarkhorseError(f"{meta_file}: missing 'config'")
    return meta


def is_complete(folder: Path) -> bool:
    return (folder / META_FILE).is_file() and (folder / MODEL_FILE).is_file()


def training_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete `step-*` dirs of a run, oldest first (`final/` not included)."""
    found = [p for p in Path(run_dir).glob(f"{STEP_PREFIX}*") if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The resumable checkpoint with the highest step: the newest `step-*` or `final/`."""
    candidates = [p for p in training_checkpoints(run_dir) if (p / STATE_FILE).is_file()]
    final = Path(run_dir) / FINAL_NAME
    if is_complete(final) and (final / STATE_FILE).is_file():
        candidates.append(final)
    return max(candidates, key=lambda p: int(read_meta(p).get("step", 0)), default=None)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step checkpoints; `final/` is never touched."""
    removed = training_checkpoints(run_dir)[:-keep_last]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, RunConfig, dict]:
    """(model in eval mode, its RunConfig, meta.json) from any darkhorse checkpoint."""
    from darkhorse.model import Transformer

    folder = Path(folder)
    meta = read_meta(folder)
    config = run_config_from_dict(meta["config"])
    if not (folder / MODEL_FILE).exists():
        raise DarkhorseError(f"{folder} is not a darkhorse checkpoint (no {MODEL_FILE})")
    with torch.device(device):
        model = Transformer(config.model)
    load_weights(model, folder, device)
    return model.eval(), config, meta


def load_weights(model: nn.Module, folder: str | Path, device: str | torch.device = "cpu") -> None:
    """Fill `model` from a checkpoint's model.safetensors; names and shapes must match exactly."""
    path = Path(folder) / MODEL_FILE
    try:
        load_safetensors_into(model, str(path), strict=True, device=str(device))
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raise DarkhorseError(f"{path} does not match its meta.json config: {' '.join(lines[1:3])}") from None


def load_trainer_state(folder: Path) -> dict[str, Any]:
    state_file = Path(folder) / STATE_FILE
    if not state_file.exists():
        raise DarkhorseError(f"{folder} has no {STATE_FILE}: it cannot be resumed (only fine-tuned from)")
    return torch.load(state_file, map_location="cpu", weights_only=True)


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG, as tensors and plain containers so `weights_only` loading accepts it."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
