"""Data parallelism applied to a built `Transformer` from outside (torchtitan's parallelize pattern):
the model code never knows whether it runs alone, under DDP or sharded by FSDP2.

- ddp: every rank holds the whole model; DDP all-reduces gradients in buckets during backward.
- fsdp: `fully_shard` on every Block and on the root (ZeRO-3): each rank holds 1/world of every
  weight, gradient and optimizer moment; blocks are all-gathered for their forward and backward and
  gradients reduce-scattered. With train.dtype=bf16 a `MixedPrecisionPolicy` computes in bf16 and
  reduces in fp32 over fp32 master shards.

With train.expert_parallel=K (DDP, K = all ranks) each rank keeps 1/K of every MoE layer's experts
(train/expert_parallel.py), which DDP leaves out of its all-reduce.

Gradient accumulation syncs only on a step's last micro-batch (`gradient_sync`). MoE layers count
their expert load per rank; `reduce_expert_load` sums the counts over ranks before the ALF bias
update, so every rank takes the same bias step and the collapse warning sees the global load.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from darkhorse.config import RunConfig, TrainConfig
from darkhorse.errors import DarkhorseError
from darkhorse.model import Transformer
from darkhorse.train.distributed import World
from darkhorse.train.expert_parallel import apply_expert_parallel, expert_parameter_names
from darkhorse.train.plan import Layout, check_layout
from darkhorse.train.routing import moe_layers


def check_parallel_config(config: RunConfig, world: World) -> None:
    """Combinations this launch cannot honour, refused before the model is built."""
    train, ep = config.train, config.train.expert_parallel
    if ep > 1:
        if train.parallel != "ddp":
            raise DarkhorseError(
                f"train.expert_parallel={ep} runs with train.parallel=ddp (not {train.parallel}) for now"
            )
        if ep != world.size:
            raise DarkhorseError(
                f"train.expert_parallel={ep} splits the experts over all ranks: start {ep} ranks, not {world.size}"
            )
        check_layout(config, Layout(world.size, train.parallel, ep))  # an MoE model whose experts divide
    if train.parallel != "fsdp":
        return
    if train.dtype == "fp16":
        raise DarkhorseError("train.dtype=fp16 is not supported with train.parallel=fsdp; use bf16")


def parallelize(
    model: Transformer, train: TrainConfig, world: World, replicated: Sequence[nn.Parameter] = ()
) -> nn.Module:
    """Shard or wrap `model` for `train.parallel`; returns the module the forward pass goes through.

    FSDP2 changes `model` in place (its parameters become DTensor shards, except `replicated`, which
    every rank keeps whole and `average_gradients` syncs) and returns it; DDP returns a wrapper
    around the unchanged model."""
    if train.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        options: dict = {"mp_policy": policy} if train.dtype == "bf16" else {}
        if replicated:
            options["ignored_params"] = set(replicated)
        for block in [*model.layers, *model.mtp]:
            fully_shard(block, **options)
        fully_shard(model, **options)
        return model
    if train.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if train.expert_parallel > 1:  # each rank's experts are its own: DDP must not average them
            apply_expert_parallel(model, world.rank, world.size)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
        device_ids = [world.local_rank] if next(model.parameters()).is_cuda else None
        # buffers (the ALF bias) stay each rank's own: reduce_expert_load keeps them equal, and a test checks it;
        # torch's FutureWarning says to keep broadcast_buffers=False for that until init_sync_buffers exists
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
            return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    return model


def gradient_sync(wrapped: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce / reduce-scatter on micro-batches that are not a step's last."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync") and not enabled:  # DDP
        return wrapped.no_sync()
    return contextlib.nullcontext()


@torch.no_grad()
def average_gradients(params: Sequence[nn.Parameter], world: World) -> None:
    """Average the gradients of parameters FSDP leaves whole (adapters) over the ranks, in one all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if world.size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(part.view_as(grad))


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP's is a replicated DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@torch.no_grad()
def reduce_expert_load(model: nn.Module, world: World) -> None:
    """Sum every MoE layer's expert-load counts of this step over the ranks (in place)."""
    if world.size == 1:
        return
    layers = moe_layers(model)
    if not layers:
        return
    counts = torch.cat([torch.cat([layer.load_since_step, layer.dropped_since_step.view(1)]) for layer in layers])
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    for layer, row in zip(layers, counts.view(len(layers), -1), strict=True):
        layer.load_since_step.copy_(row[:-1])
        layer.dropped_since_step.copy_(row[-1])
