"""Expert parallelism: each rank holds E/K of every MoE layer's routed experts, and token slots travel
to the rank that holds their expert and back with two all-to-alls (in backward, the reverse two).

Applied from outside, like train/parallel.py: `apply_expert_parallel` swaps each MoE layer's
`RoutedExperts` for an `ExpertParallelExperts` holding only this rank's experts. The MoE layer still
routes, sorts slots by expert and combines; only the expert computation moves. Its parameters keep
their names with E/K rows, so the rest of the model (and its gradient sync, which must skip them:
`expert_parameter_names`) stays unchanged; `full_expert_tensor` gathers one back for checkpoints.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from darkhorse.model.moe import RoutedExperts


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
            for name in ("gate_proj", "up_proj", "down_proj"):
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
