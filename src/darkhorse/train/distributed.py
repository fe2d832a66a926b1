"""The processes of a torchrun launch: which rank this is, the process group, and the few collectives
the training loop needs.

torchrun (one node, or several with a c10d rendezvous) sets RANK, WORLD_SIZE and LOCAL_RANK; a
plain `darkhorse train` sets none and is world 1 with no process group. Only rank 0 prints and
writes metrics; every rank keeps its own log. A collective that fails or waits longer than
train.dist_timeout (a rank died) becomes a one-line `DarkhorseError` on the ranks still alive, so
they exit instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from darkhorse.config import TrainConfig
from darkhorse.errors import DarkhorseError, RankFailure
from darkhorse.model.transformer import IGNORE_INDEX

COLLECTIVE_FAILURES = ("gloo", "NCCL", "Connection closed", "Connection reset", "timed out", "Timeout")
LAUNCH_HINT = "torchrun --nproc-per-node N -m darkhorse train ... (or `darkhorse train --nproc N`)"


@dataclass(frozen=True)
class World:
    """This process's place in the launch (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    timeout: int = 600

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """Whether a process group exists (torchrun, even with one process)."""
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), readable before any setup."""
    return int(os.environ.get("RANK", "0"))


def init_world(train: TrainConfig, device: torch.device) -> World:
    """Join the torchrun process group that `train.parallel` needs (or check that none is needed)."""
    if not launched_by_torchrun():
        if train.parallel != "none":
            raise DarkhorseError(f"train.parallel={train.parallel} runs under torchrun: {LAUNCH_HINT}")
        return World(timeout=train.dist_timeout)
    size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if train.parallel == "none" and size > 1:
        raise DarkhorseError(
            f"torchrun started {size} processes but train.parallel is none; set train.parallel=ddp or fsdp"
        )
    if train.parallel == "none":
        return World(timeout=train.dist_timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timedelta(seconds=train.dist_timeout))
    return World(rank=rank, size=size, local_rank=local_rank, timeout=train.dist_timeout)


def shutdown(world: World) -> None:
    if world.launched:
        dist.destroy_process_group()


@contextlib.contextmanager
def collective_errors(world: World) -> Iterator[None]:
    """Turn a failed collective (a peer died, or went silent past the timeout) into a `RankFailure`."""
    try:
        yield
    except (DarkhorseError, KeyboardInterrupt):
        raise
    except RuntimeError as exc:  # dist.DistError is one; gloo raises plain RuntimeErrors too
        lost = isinstance(exc, dist.DistError) or any(mark in str(exc) for mark in COLLECTIVE_FAILURES)
        if not lost or not world.launched or world.size == 1:
            raise  # a bug, not a lost rank: keep its traceback
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise RankFailure(
            f"rank {world.rank}: lost the other ranks (one died or hung past train.dist_timeout="
            f"{world.timeout}s); see RUN_DIR/logs/ for each rank's log ({first[:160]})"
        ) from None


def average(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all ranks (itself without a process group)."""
    if world.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= world.size
    return tensor


def token_weight(world: World, targets: torch.Tensor) -> torch.Tensor | float:
    """This rank's share of the learned (unmasked) targets of a micro-batch, times the world size.

    Each rank's loss is a mean over its own learned tokens; scaled by this weight, the ranks' average
    is the mean over every learned token of the global micro-batch, as one process computes it (with
    loss-masked chat data the ranks learn different numbers of tokens)."""
    if world.size == 1:
        return 1.0
    count = (targets != IGNORE_INDEX).sum().float().reshape(1)
    total = count.clone()
    dist.all_reduce(total)
    return (count * world.size / total.clamp(min=1)).squeeze()


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a stop signal reached one rank)."""
    if world.size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def broadcast(world: World, value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def per_rank_batch(batch_size: int, saved_world: int, world: int) -> int:
    """The micro-batch per rank that keeps a resumed run's global batch when the world size changed."""
    global_rows = batch_size * saved_world
    if global_rows % world:
        raise DarkhorseError(
            f"the checkpoint was trained on {saved_world} ranks with train.batch_size={batch_size} per rank "
            f"({global_rows} rows per micro-step); {world} ranks cannot split that evenly: resume on a world "
            f"size that divides {global_rows}"
        )
    return global_rows // world
