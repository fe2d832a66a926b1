"""Expert parallelism: each rank holds E/K of every MoE layer's routed experts, and token slots travel
to the rank that holds their expert and back with two all-to-alls (in backward, the reverse two).

Applied from outside, like train/parallel.py: `apply_expert_parallel` swaps each MoE layer's
`RoutedExperts` for an `ExpertParallelExperts` holding only this rank's experts. The MoE layer still
routes, sorts slots by expert and combines; only the expert computation moves. Its parameters keep
their names with E/K rows, so the rest of the model (and its gradient sync, which must skip them:
`expert_parameter_names`) stays unchanged; `full_expert_tensor` gathers one back for checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from darkhorse.errors import DarkhorseError
from darkhorse.model.moe import RoutedExperts

EXPERT_TENSORS = ("gate_proj", "up_proj", "down_proj")


class _AllToAll(torch.autograd.Function):
    """Rows of `x` split by `send` go to each rank; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], receive: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (send, receive), group
        out = x.new_empty((sum(receive), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), receive, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        send, receive = ctx.splits
        out = grad.new_empty((sum(send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), send, receive, group=ctx.group)
        return out, None, None, None


class ExpertParallelExperts(RoutedExperts):
    """Experts [rank * E/K, (rank + 1) * E/K) of one MoE layer, copied from the full `experts`."""

    def __init__(self, experts: RoutedExperts, rank: int, size: int, group=None) -> None:
        n_experts, hidden, dim = experts.gate_proj.shape
        local = n_experts // size
        super().__init__(local, dim, hidden)
        self.rank, self.size, self.group, self.n_experts = rank, size, group, n_experts
        rows = slice(rank * local, (rank + 1) * local)
        with torch.no_grad():
            for name in EXPERT_TENSORS:
                getattr(self, name).copy_(getattr(experts, name)[rows])

    def forward(self, x: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool | None = None) -> torch.Tensor:
        """`x` [N, D]: this rank's slots sorted by (global) expert, `counts[e]` of them for expert e."""
        local = self.n_experts // self.size
        received_counts = torch.empty_like(counts)  # [source rank, local expert] slots coming here
        dist.all_to_all_single(received_counts, counts, group=self.group)
        send = counts.view(self.size, local).sum(1).tolist()
        receive = received_counts.view(self.size, local).sum(1).tolist()
        arrived = _AllToAll.apply(x, send, receive, self.group)  # grouped by source rank, then by expert
        expert_of_row = torch.repeat_interleave(
            torch.arange(local, device=x.device).repeat(self.size), received_counts.to(x.device)
        )
        order = expert_of_row.argsort(stable=True)
        out = super().forward(arrived[order], received_counts.view(self.size, local).sum(0), use_grouped_mm)
        back = torch.empty_like(out).index_copy_(0, order, out)  # source-rank order again
        return _AllToAll.apply(back, receive, send, self.group)


def apply_expert_parallel(model: nn.Module, rank: int, size: int, group=None) -> list[ExpertParallelExperts]:
    """Give every MoE layer of `model` only this rank's experts (call with the full weights loaded)."""
    swapped = []
    for module in list(model.modules()):
        experts = getattr(module, "experts", None)
        if isinstance(experts, RoutedExperts) and not isinstance(experts, ExpertParallelExperts):
            if type(experts) is not RoutedExperts:  # e.g. LoRA experts: their adapters would be dropped
                raise DarkhorseError(
                    f"train.expert_parallel splits plain routed experts only, not {type(experts).__name__}; "
                    "fine-tune with train.parallel=ddp or fsdp and train.expert_parallel=1"
                )
            module.experts = ExpertParallelExperts(experts, rank, size, group)
            swapped.append(module.experts)
    return swapped


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters each rank holds its own part of (what DDP must not all-reduce)."""
    return [
        f"{prefix}.{name}"
        for prefix, module in model.named_modules()
        if isinstance(module, ExpertParallelExperts)
        for name, _ in module.named_parameters()
    ]


def full_expert_tensor(local: torch.Tensor, size: int, group=None) -> torch.Tensor:
    """The E rows of an expert tensor (weights or an optimizer moment) from each rank's E/K."""
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()]


@torch.no_grad()
def average_expert_gradients(model: nn.Module, size: int) -> None:
    """An expert's gradient sums the losses of all `size` ranks, whose mean is the objective: divide."""
    for param in expert_parameters(model):
        if param.grad is not None:
            param.grad /= size


def clip_gradients(params: list[nn.Parameter], experts: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip by the global norm: the replicated gradients' (equal on every rank) plus every rank's experts'."""
    held = {id(p) for p in experts}
    replicated = [p.grad for p in params if id(p) not in held]
    own = [p.grad for p in params if id(p) in held]
    expert_sq = torch.nn.utils.get_total_norm(own) ** 2 if own else torch.zeros(())
    dist.all_reduce(expert_sq)
    total = (torch.nn.utils.get_total_norm(replicated) ** 2 + expert_sq).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


@contextlib.contextmanager
def gathered_experts(model: nn.Module) -> Iterator[None]:
    """Every expert tensor whole (E rows) for the duration, on every rank: what a checkpoint saves."""
    modules = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
    local = [{name: getattr(m, name) for name in EXPERT_TENSORS} for m in modules]
    try:
        for module in modules:
            for name in EXPERT_TENSORS:
                full = full_expert_tensor(getattr(module, name).detach(), module.size, module.group)
                setattr(module, name, nn.Parameter(full, requires_grad=False))
        yield
    finally:
        for module, params in zip(modules, local, strict=True):
            for name, param in params.items():
                setattr(module, name, param)


def _expert_state_indices(optimizer: torch.optim.Optimizer, experts: list[nn.Parameter]) -> list[int]:
    held = {id(p) for p in experts}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [index for index, param in enumerate(params) if id(param) in held]


def _map_expert_moments(optimizer: torch.optim.Optimizer, state: dict[str, Any], experts, change) -> dict[str, Any]:
    """`state` (an optimizer state dict) with `change` applied to every expert moment, in new dicts:
    `optimizer.state_dict()` shares its per-parameter dicts with the live optimizer."""
    for index in _expert_state_indices(optimizer, experts):
        entry = state["state"].get(index)
        if entry is not None:
            state["state"][index] = {
                key: change(value) if torch.is_tensor(value) and value.dim() > 0 else value
                for key, value in entry.items()
            }
    return state


def gather_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[str, Any], experts: list[nn.Parameter], size: int
) -> dict[str, Any]:
    """`optimizer.state_dict()` with each expert moment whole (E rows), as one process would hold it."""
    return _map_expert_moments(optimizer, state, experts, lambda value: full_expert_tensor(value, size))


def slice_optimizer_state(
    optimizer: torch.optim.Optimizer, state: dict[str, Any], experts: list[nn.Parameter], rank: int, size: int
) -> dict[str, Any]:
    """The inverse of `gather_optimizer_state`: this rank's rows of each expert moment."""

    def mine(value: torch.Tensor) -> torch.Tensor:
        rows = value.shape[0] // size
        return value[rank * rows : (rank + 1) * rows].clone()

    return _map_expert_moments(optimizer, state, experts, mine)
