"""Sharded checkpoints of FSDP runs, with torch.distributed.checkpoint (DCP).

Each rank writes its own shards of the weights and optimizer moments into `shards/` of one staged
directory, which rank 0 completes (meta.json, tokenizer, trainer_state.pt without optimizer state)
and renames into place, as atomically as a single-process save (`files.atomic_dir`). DCP records the
global shape of every tensor, so a checkpoint saved by W ranks loads on any other number of ranks
(or into a plain model in one process, which is what `consolidate` does to write today's
single-file checkpoint for export, merge and inference).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from darkhorse import checkpoint as ckpt
from darkhorse.config import RunConfig, run_config_from_dict
from darkhorse.errors import DarkhorseError
from darkhorse.files import atomic_dir
from darkhorse.train.distributed import World, barrier, broadcast


def save_sharded_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    config: RunConfig,
    tokenizer_file: Path | None,
    meta: dict[str, Any],
    trainer_state: dict[str, Any],
    world: World,
) -> Path:
    """Every rank calls this together; `folder` appears complete or not at all."""
    model_state, optim_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optim": optim_state}
    if world.is_main:
        with atomic_dir(folder, force=True) as staged:
            broadcast(world, str(staged))
            dcp.save(state, checkpoint_id=staged / ckpt.SHARDS_DIR)
            ckpt.write_meta_and_tokenizer(staged, config, tokenizer_file, meta)
            ckpt.save_trainer_state(trainer_state, staged / ckpt.STATE_FILE)
    else:
        staged = Path(broadcast(world, None))
        dcp.save(state, checkpoint_id=staged / ckpt.SHARDS_DIR)
    barrier(world)  # no rank goes on (or prunes) before rank 0 has renamed the checkpoint into place
    return Path(folder)


def check_shards(folder: Path) -> None:
    """Every shard file the checkpoint's DCP metadata names must be there (named when missing)."""
    shards = Path(folder) / ckpt.SHARDS_DIR
    try:
        metadata = dcp.FileSystemReader(str(shards)).read_metadata()
    except (OSError, ValueError, RuntimeError) as exc:
        raise DarkhorseError(f"{shards}: unreadable shard metadata ({exc})") from None
    files = sorted({item.relative_path for item in metadata.storage_data.values()})
    missing = [name for name in files if not (shards / name).is_file()]
    if missing:
        raise DarkhorseError(
            f"{shards} is missing {len(missing)} of its {len(files)} shard files: {', '.join(missing)}; "
            "copy them back or resume from another checkpoint"
        )


def load_sharded_checkpoint(folder: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """Fill the (sharded or plain) `model` and its `optimizers` from `folder`, resharding as needed."""
    check_shards(folder)
    model_state, optim_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=Path(folder) / ckpt.SHARDS_DIR)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_sharded_weights(folder: Path, model: nn.Module) -> None:
    """Only the weights of a sharded checkpoint, into `model` (fine-tuning or consolidating)."""
    check_shards(folder)
    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=Path(folder) / ckpt.SHARDS_DIR)
    set_model_state_dict(model, state["model"])


def consolidate(folder: Path, out: Path, force: bool = False) -> Path:
    """Today's single-file checkpoint (model.safetensors, meta.json, tokenizer) from a sharded one."""
    from darkhorse.model import Transformer

    folder = Path(folder)
    if not ckpt.is_sharded(folder):
        raise DarkhorseError(f"{folder} is not a sharded checkpoint (no {ckpt.SHARDS_DIR}/.metadata)")
    if Path(out).exists() and not force:
        raise DarkhorseError(f"{out} already exists; pass --force to replace it")
    meta = ckpt.read_meta(folder)
    config = run_config_from_dict(meta["config"])
    model = Transformer(config.model)
    load_sharded_weights(folder, model)
    tokenizer = folder / ckpt.TOKENIZER_FILE
    record = {key: value for key, value in meta.items() if key not in ("config", "darkhorse_version")}
    return ckpt.save_model_checkpoint(out, model.eval(), config, tokenizer if tokenizer.is_file() else None, record)
