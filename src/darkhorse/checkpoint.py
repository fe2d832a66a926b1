"""The one checkpoint format: what `train` writes and generate, chat, eval and export read.

    RUN_DIR/step-000123/ and RUN_DIR/final/, each holding
        model.safetensors   weights (a tied embedding/head stored once)
        meta.json           {"config", "step", "tokens_seen", "loss", "darkhorse_version", ...}
        tokenizer.json      copied from the prepared data dir (with a foreign tokenizer's
                            tokenizer_config.json / chat_template.jinja when it has them)
        trainer_state.pt    optimizer, scheduler, scaler, RNG and data position (training only)
        shards/             instead of model.safetensors and the optimizer state, in a checkpoint of an
                            FSDP run: torch.distributed.checkpoint shards (train/sharded.py), which
                            `darkhorse consolidate` turns into model.safetensors

A checkpoint is written with `files.atomic_dir` (a hidden temp dir beside its target, fsynced, then
renamed into place), so a crash mid-save leaves the previous checkpoints intact and no half-written
directory under a valid name. Nothing is ever unpickled: weights come from safetensors and the
trainer state through `torch.load(weights_only=True)`. Pruning renames a checkpoint to a hidden name
before deleting it (`files.remove_dir`), so a killed prune leaves no half-deleted `step-*` either.
`damage` tells a torn checkpoint (truncated weights or trainer state, unreadable meta.json) from an
intact one without loading it, so resume can fall back to the newest intact one. Weights that are not
finite (a run that diverged) are refused wherever they are loaded, with the step they were saved at.

Three ways to read one, all here: `load_model` (model, RunConfig, meta) for training code,
`load_for_inference` (model, tokenizer, meta) for generate, chat, eval and the demo, and
`CheckpointTensors`, one tensor at a time without building the model, for export and GGUF.

Weights are written by `write_safetensors`, which streams one tensor at a time into the file
(safetensors' own `save_file` first serialises every tensor into one bytes object, a second copy of
the model), so saving a model costs no memory beyond the model itself.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import shutil
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors_into
from torch import nn

from darkhorse import __version__
from darkhorse.config import ModelConfig, RunConfig, run_config_from_dict
from darkhorse.data.tokenizer import SIDECAR_FILES, TOKENIZER_FILE, Tokenizer
from darkhorse.errors import ConfigError, DarkhorseError, naming, parsing
from darkhorse.files import atomic_dir, check_fields, read_json_object, remove_dir, remove_partial_writes

MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"  # a LoRA checkpoint (darkhorse.finetune) holds this instead
META_FILE = "meta.json"
STATE_FILE = "trainer_state.pt"
SHARDS_DIR = "shards"  # an FSDP run's torch.distributed.checkpoint shards, instead of model.safetensors
FINAL_NAME = "final"
STEP_PREFIX = "step-"
META_TYPES = {"config": dict, "step": int, "tokens_seen": int, "loss": float, "darkhorse_version": str, "import": dict}


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def remove_stale_temp_dirs(run_dir: Path) -> None:
    """Temp dirs left by a save that was killed; they never hold a checkpoint anyone can use."""
    remove_partial_writes(run_dir)


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
    write_meta_and_tokenizer(folder, config, tokenizer_file, meta)


def write_meta_and_tokenizer(
    folder: Path, config: RunConfig, tokenizer_file: Path | None, meta: dict[str, Any]
) -> None:
    """meta.json and the tokenizer: everything of a checkpoint but its weights and trainer state."""
    record = {**meta, "config": config.to_dict(), "darkhorse_version": __version__}  # the model saved decides
    (folder / META_FILE).write_text(json.dumps(record, indent=2) + "\n")
    copy_tokenizer(tokenizer_file, folder)


def copy_tokenizer(tokenizer_file: Path | None, folder: Path) -> None:
    """tokenizer.json into `folder`, with a foreign tokenizer's settings files beside it."""
    if tokenizer_file is not None and Path(tokenizer_file).exists():
        shutil.copyfile(tokenizer_file, folder / TOKENIZER_FILE)
        if Path(tokenizer_file).name == TOKENIZER_FILE:  # a foreign tokenizer's settings travel with it
            for name in SIDECAR_FILES:
                if Path(tokenizer_file).with_name(name).is_file():
                    shutil.copyfile(Path(tokenizer_file).with_name(name), folder / name)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's persistent tensors (name, dtype, shape, bytes, in name order): the same
    weights give the same value however they were stored, so an adapter can name the base it fits."""
    digest = hashlib.sha256()
    for name, tensor in unique_state(model):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{SAFETENSORS_DTYPES[tensor.dtype]}|{tuple(tensor.shape)}\n".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return "sha256:" + digest.hexdigest()


def save_model_checkpoint(
    folder: str | Path, model: nn.Module, config: RunConfig, tokenizer_file: Path | None, meta: dict[str, Any]
) -> Path:
    """Weights, meta and tokenizer without trainer state (e.g. an imported model).

    Replaces `folder` if it exists: callers decide whether that is allowed (--force).
    """
    with atomic_dir(folder, force=True) as temp:
        _write_model_files(temp, model, config, tokenizer_file, meta)
    return Path(folder)


def save_training_checkpoint(
    folder: Path,
    model: nn.Module,
    config: RunConfig,
    tokenizer_file: Path | None,
    meta: dict[str, Any],
    trainer_state: dict[str, Any],
) -> Path:
    """A resumable checkpoint: the model files plus `trainer_state.pt`."""
    with atomic_dir(folder, force=True) as temp:
        _write_model_files(temp, model, config, tokenizer_file, meta)
        save_trainer_state(trainer_state, temp / STATE_FILE)
    return Path(folder)


def save_trainer_state(state: dict[str, Any], path: Path) -> None:
    """torch.save, with a full disk reported as the OSError it is (torch says only "unexpected pos"). The file
    is opened here so that a failed write closes it: given a path, torch's writer keeps its file open for as
    long as the exception's traceback lives, which holds a full disk busy in a process that goes on."""
    try:
        with open(path, "wb") as file:
            torch.save(state, file)
    except RuntimeError as exc:
        disk = os.statvfs(path.parent)
        if disk.f_bavail * disk.f_frsize >= 1 << 20:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DarkhorseError(f"checkpoint directory not found: {folder}")
    meta_file = folder / META_FILE
    if not meta_file.exists():
        raise DarkhorseError(f"{folder} is not a darkhorse checkpoint (no {META_FILE})")
    meta = read_json_object(meta_file)
    if "config" not in meta:
        raise DarkhorseError(f"{meta_file}: missing 'config'")
    check_fields(meta_file, meta, META_TYPES, nullable=("loss",))
    try:
        run_config_from_dict(meta["config"])  # every reader builds it: a wrong field fails here, naming the file
    except ConfigError as exc:
        raise DarkhorseError(f"{meta_file}: {exc}") from None
    return meta


def is_sharded(folder: Path) -> bool:
    """A checkpoint an FSDP run saved: its weights and optimizer state are shards (train/sharded.py)."""
    return (Path(folder) / SHARDS_DIR / ".metadata").is_file()


def is_complete(folder: Path) -> bool:
    """meta.json plus weights: a model, a LoRA adapter or shards (only the trainer resumes from those)."""
    weights = (folder / MODEL_FILE).is_file() or (folder / ADAPTER_FILE).is_file() or is_sharded(folder)
    return (folder / META_FILE).is_file() and weights


def training_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete `step-*` dirs of a run, oldest first (`final/` not included)."""
    found = [p for p in Path(run_dir).glob(f"{STEP_PREFIX}*") if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def _step_of(folder: Path) -> int:
    """The step a checkpoint was saved at: in its name for `step-*`, in meta.json for `final/`."""
    try:
        if folder.name.startswith(STEP_PREFIX):
            return int(folder.name.removeprefix(STEP_PREFIX))
        return int(read_meta(folder).get("step", 0))
    except (DarkhorseError, OSError, TypeError, ValueError):
        return -1  # unreadable: damaged, tried last


def resumable_checkpoints(run_dir: str | Path) -> list[Path]:
    """`step-*` and `final/` dirs with trainer state, newest (highest step) first; not checked for `damage`."""
    candidates = [p for p in training_checkpoints(run_dir) if (p / STATE_FILE).is_file()]
    final = Path(run_dir) / FINAL_NAME
    if is_complete(final) and (final / STATE_FILE).is_file():
        candidates.append(final)
    return sorted(candidates, key=_step_of, reverse=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The resumable checkpoint with the highest step: the newest `step-*` or `final/`."""
    return next(iter(resumable_checkpoints(run_dir)), None)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step checkpoints; `final/` is never touched."""
    removed = training_checkpoints(run_dir)[:-keep_last]
    for folder in removed:
        remove_dir(folder)
    return removed


def damage(folder: Path) -> str | None:
    """Why `folder` is not an intact resumable checkpoint, or None: meta.json must parse with a config,
    model.safetensors (not in a sharded one) must be as long as its header says and trainer_state.pt must be a whole zip
    archive (torch.save's format; its directory is at the end, so any truncation shows). Cheap: no
    tensor is read."""
    try:
        run_config_from_dict(read_meta(folder)["config"])
    except (DarkhorseError, OSError, TypeError, ValueError) as exc:
        return f"{META_FILE}: {exc}"
    if not is_sharded(folder):  # shards: DCP's metadata names them; loading checks each is there
        problem = _weights_damage(folder)
        if problem:
            return problem
    try:
        with zipfile.ZipFile(folder / STATE_FILE) as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return f"{STATE_FILE} is truncated or unreadable"
    return None


def _weights_damage(folder: Path) -> str | None:
    """Why the model or adapter file is not whole, or None (its safetensors header against its size)."""
    weights = folder / MODEL_FILE if (folder / MODEL_FILE).is_file() else folder / ADAPTER_FILE
    try:
        with open(weights, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > weights.stat().st_size:
                return f"{weights.name} is truncated"
            header = json.loads(handle.read(length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        if weights.stat().st_size != 8 + length + max(ends, default=0):
            return f"{weights.name} is truncated or padded"
    except (OSError, struct.error, ValueError, TypeError, KeyError, IndexError):
        return f"{weights.name} is unreadable"
    return None


def _weights_file(folder: Path) -> Path:
    path = folder / MODEL_FILE
    if (folder / ADAPTER_FILE).is_file() and not path.is_file():
        raise DarkhorseError(f"{folder} holds a LoRA adapter, not a model: merge it into its base first")
    if is_sharded(folder) and not path.is_file():
        raise DarkhorseError(
            f"{folder} holds a sharded (FSDP) checkpoint: turn it into one file with `darkhorse consolidate {folder}`"
        )
    if not path.is_file():
        raise DarkhorseError(f"{folder} is not a darkhorse checkpoint (no {MODEL_FILE})")
    return path


def _tokenizer_file(folder: Path) -> Path:
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise DarkhorseError(f"{folder} has no {TOKENIZER_FILE}; copy the one from the prepared data dir")
    return path


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, RunConfig, dict]:
    """(model in eval mode, its RunConfig, meta.json) from any darkhorse checkpoint."""
    from darkhorse.model import Transformer

    folder = Path(folder)
    meta = read_meta(folder)
    config = run_config_from_dict(meta["config"])
    _weights_file(folder)
    with torch.device(device):
        model = Transformer(config.model)
    load_weights(model, folder, device)
    return model.eval(), config, meta


def load_for_inference(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Tokenizer, dict]:
    """(model in eval mode, its tokenizer, meta) for generate, chat and eval; meta["config"] is the RunConfig.

    Every file is checked before the weights are read, so a wrong path fails at once."""
    folder = Path(folder)
    read_meta(folder)
    _weights_file(folder)
    tokenizer = Tokenizer.from_file(_tokenizer_file(folder))
    model, config, meta = load_model(folder, device)
    return model, tokenizer, {**meta, "config": config}


def load_weights(model: nn.Module, folder: str | Path, device: str | torch.device = "cpu") -> None:
    """Fill `model` from a checkpoint's model.safetensors; names and shapes must match exactly."""
    path = Path(folder) / MODEL_FILE
    try:
        with parsing(path, "safetensors file", SafetensorError):
            load_safetensors_into(model, str(path), strict=True, device=str(device))
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raise DarkhorseError(f"{path} does not match its meta.json config: {' '.join(lines[1:3])}") from None
    check_loss(Path(folder))
    for name, tensor in model.state_dict().items():
        check_finite(tensor, name, Path(folder))


def _diverged(folder: Path, reason: str) -> DarkhorseError:
    try:
        where = f"{folder} (step {read_meta(folder).get('step', '?')})"
    except DarkhorseError:  # e.g. a PEFT adapter made elsewhere: no meta.json
        where = str(folder)
    return DarkhorseError(f"{where} is from a diverged run ({reason}); use an earlier checkpoint")


def check_loss(folder: Path) -> None:
    """Refuse a checkpoint whose recorded loss is NaN or inf (saved before darkhorse refused to)."""
    loss = read_meta(folder).get("loss")
    if isinstance(loss, float) and not math.isfinite(loss):
        raise _diverged(folder, f"its loss is {loss}")


def check_finite(tensor: torch.Tensor, name: str, folder: Path) -> None:
    """Refuse weights holding NaN or inf: what a diverged run would have saved (never usable)."""
    if tensor.is_floating_point() and tensor.element_size() > 1 and not bool(torch.isfinite(tensor).all()):
        raise _diverged(folder, f"{name} holds NaN or inf")


def load_trainer_state(folder: Path) -> dict[str, Any]:
    state_file = Path(folder) / STATE_FILE
    if not state_file.exists():
        raise DarkhorseError(f"{folder} has no {STATE_FILE}: it cannot be resumed (only fine-tuned from)")
    with naming(state_file):
        return torch.load(state_file, map_location="cpu", weights_only=True)


def open_safetensors(path: str | Path):
    """A safetensors handle that reads with pread: with mmap every page read stays mapped into the
    process until the handle closes, so streaming a whole model out would hold the file in RSS."""
    with naming(path), parsing(path, "safetensors file", SafetensorError):
        try:
            return safe_open(str(path), framework="pt", backend="pread")
        except TypeError:  # safetensors < 0.8 has only mmap
            return safe_open(str(path), framework="pt")


class CheckpointTensors:
    """A checkpoint's meta, config and tokenizer file, and its weights read one tensor at a time.

    What export and GGUF read: no model is built, so peak memory is one tensor. `get` checks each
    tensor against the config (present, a tied head under either name since the weights store it
    once, and the shape the config implies): a checkpoint `load_model` refuses fails here too, at the
    first tensor that is wrong, and exporters refuse what they cannot write before reading any.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder)
        self.meta = read_meta(self.path)
        self.config: RunConfig = run_config_from_dict(self.meta["config"])
        self.weights_file = _weights_file(self.path)
        self.tokenizer_file = _tokenizer_file(self.path)
        check_loss(self.path)
        self._weights = open_safetensors(self.weights_file)
        self.names = set(self._weights.keys())
        self.expected = expected_shapes(self.config.model)
        tied = {"embed.weight", "lm_head.weight"}
        self._tied = tied if self.model.tie_embeddings else set()
        self.used: set[str] = set()

    @property
    def model(self) -> ModelConfig:
        """The model's config (`config.model`)."""
        return self.config.model

    def _stored_name(self, name: str) -> str | None:
        candidates = [name, *sorted(self._tied - {name})] if name in self._tied else [name]
        return next((candidate for candidate in candidates if candidate in self.names), None)

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` as stored (dtype included); a tied head reads the embedding it shares."""
        stored = self._stored_name(name)
        if stored is None:
            raise DarkhorseError(f"{self.weights_file}: tensor '{name}' is missing")
        with parsing(self.weights_file, "safetensors file", SafetensorError):
            tensor = self._weights.get_tensor(stored)
        check_finite(tensor, name, self.path)
        if name in self.expected and tuple(tensor.shape) != self.expected[name]:
            raise DarkhorseError(
                f"{self.weights_file}: {name} has shape {tuple(tensor.shape)}, its config needs {self.expected[name]}"
            )
        self.used |= self._tied if name in self._tied else {name}
        return tensor

    def unread(self) -> list[str]:
        """Stored tensors no `get` asked for: what an export would silently leave out."""
        return sorted(self.names - self.used)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every persistent tensor of a model with `config`, by name (built on the meta device: no memory)."""
    from darkhorse.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


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
