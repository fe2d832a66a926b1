"""Optimizers: AdamW for everything, or Muon for weight matrices plus AdamW/Lion for the rest.

Muon (orthogonalised momentum) suits hidden weight matrices; embeddings, the output head, norms
and other 1-D parameters keep an element-wise optimizer, as nanochat and Kimi's Moonlight do.
Buffers (e.g. a MoE routing bias) are never parameters, so they never reach an optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from darkhorse.config import TrainConfig

LION_BETAS = (0.9, 0.99)  # Chen et al. (2023), as the nanochat-train recipe uses


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023): the sign of an interpolated momentum, so every update has size lr.

    Its lr wants to be about 3-10x smaller than AdamW's for the same parameters; torch has none.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = LION_BETAS,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(param)
                momentum = state["exp_avg"]
                update = momentum.lerp(param.grad, 1 - beta1).sign_()
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"])
                momentum.lerp_(param.grad, 1 - beta2)
        return loss


class ExpertMuon(torch.optim.Muon):
    """torch's Muon, extended to 3-D expert stacks `[experts, out, in]`, one matrix per expert.

    torch's Muon accepts 2-D parameters only. Each stack is registered as per-expert views that share
    its storage (so the state dict, and a checkpoint, hold one momentum per expert, as torch's Muon
    would), but a stack's step runs batched over its experts: one Newton-Schulz iteration of batched
    matmuls instead of one per expert (same result bit for bit, ~2x faster on CPU). Its views carry no
    gradient, so torch's step, which does the 2-D parameters, skips them.
    """

    def __init__(self, params: Iterable[nn.Parameter], **options) -> None:
        self._stacks: list[tuple[nn.Parameter, list[torch.Tensor]]] = []
        self.entries: list[tuple[nn.Parameter, int]] = []  # each parameter and its state entries, in order
        matrices: list[torch.Tensor] = []
        for param in params:
            if param.ndim == 3:
                views = list(param.detach().unbind(0))
                self._stacks.append((param, views))
                matrices.extend(views)
            else:
                matrices.append(param)
            self.entries.append((param, param.shape[0] if param.ndim == 3 else 1))
        super().__init__(matrices, **options)
        self._momentum_stacks: list[torch.Tensor | None] = [None] * len(self._stacks)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, (stack, views) in enumerate(self._stacks):
            if stack.grad is not None:
                self._step_stack(index, stack, views)
        super().step()
        return loss

    def _step_stack(self, index: int, stack: nn.Parameter, views: list[torch.Tensor]) -> None:
        group = next(g for g in self.param_groups if any(p is views[0] for p in g["params"]))
        momentum = group["momentum"]
        buffer = self._momentum_stack(index, stack, views)
        buffer.lerp_(stack.grad, 1 - momentum)
        update = stack.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
        stack.mul_(1 - group["lr"] * group["weight_decay"])
        stack.add_(update, alpha=-muon_lr_scale(group["adjust_lr_fn"], stack.shape[-2:]) * group["lr"])

    def _momentum_stack(self, index: int, stack: nn.Parameter, views: list[torch.Tensor]) -> torch.Tensor:
        """The stack's momentum as one [experts, out, in] tensor whose rows are the views' state entries;
        rebuilt from them after `load_state_dict` (which gives each entry a tensor of its own)."""
        stacked = self._momentum_stacks[index]
        states = [self.state[view] for view in views]
        first = states[0].get("momentum_buffer")
        if stacked is None or first is None or first.data_ptr() != stacked.data_ptr():
            loaded = [state.get("momentum_buffer") for state in states]
            stacked = torch.stack(loaded) if all(b is not None for b in loaded) else torch.zeros_like(stack)
            for state, row in zip(states, stacked.unbind(0), strict=True):
                state["momentum_buffer"] = row
            self._momentum_stacks[index] = stacked
        return stacked

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The stacks' gradients too: no param group holds the stacks, so the base class never clears them
        (their gradients summed over every step before this fix, and a resumed run started from zero)."""
        super().zero_grad(set_to_none)
        for stack, _ in self._stacks:
            if set_to_none:
                stack.grad = None
            elif stack.grad is not None:
                stack.grad.zero_()


def orthogonalise(
    update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration toward the nearest (semi-)orthogonal matrix, in bf16, over
    the last two dims of `update` (a batch of matrices at once). Each matrix is first scaled to unit
    Frobenius norm; wide matrices are iterated as they are, tall ones transposed."""
    a, b, c = coefficients
    tall = update.size(-2) > update.size(-1)
    x = update.bfloat16()
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def muon_lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's Muon lr adjustment for an [out, in] matrix: `original` sqrt(max(1, out/in)),
    `match_rms_adamw` 0.2 sqrt(max(out, in))."""
    rows, cols = shape
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def _is_head(name: str) -> bool:
    return name.split(".")[-2:] == ["lm_head", "weight"]


def split_parameters(
    model: nn.Module,
) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices, embedding tables, untied output head, 1-D params); tied weights appear once,
    as an embedding table."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden, embeddings, head, vectors = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2:
            vectors.append(param)
        elif id(param) in embedding_params:
            embeddings.append(param)
        elif _is_head(name):
            head.append(param)
        else:
            hidden.append(param)
    return hidden, embeddings, head, vectors


def _element_wise_groups(embeddings: list, head: list, vectors: list, train: TrainConfig) -> list[dict]:
    """Embeddings and head at their own lr (train.embedding_lr, train.head_lr; 0 = train.lr), decayed;
    1-D params at train.lr, undecayed. Empty groups are left out."""
    decay = {"weight_decay": train.weight_decay}
    groups = [
        {"params": embeddings, "lr": train.embedding_lr or train.lr, **decay},
        {"params": head, "lr": train.head_lr or train.lr, **decay},
        {"params": vectors, "lr": train.lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _adamw(groups: list[dict], train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # fused kernels exist for CUDA, MPS and CPU in recent torch; foreach is the fallback
    fused = device.type in ("cuda", "cpu", "mps")
    return torch.optim.AdamW(
        groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=fused, foreach=None if fused else True
    )


def build_optimizers(model: nn.Module, train: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """The optimizers for `train.optimizer`; call after the model is on its device.

    Weight decay applies to matrices only (norm gains and other 1-D params stay undecayed); the
    embeddings and an untied head take their own lr when train.embedding_lr / train.head_lr give one.
    """
    hidden, embeddings, head, vectors = split_parameters(model)
    groups = _element_wise_groups(embeddings, head, vectors, train)
    if train.optimizer == "adamw":
        if hidden:
            groups.insert(0, {"params": hidden, "lr": train.lr, "weight_decay": train.weight_decay})
        return [_adamw(groups, train, device)]

    optimizers: list[torch.optim.Optimizer] = []
    if hidden:
        optimizers.append(
            ExpertMuon(hidden, lr=train.muon_lr, weight_decay=train.weight_decay, adjust_lr_fn="original")
        )
    if groups:
        if train.scalar_optimizer == "lion":
            optimizers.append(Lion(groups, lr=train.lr))
        else:
            optimizers.append(_adamw(groups, train, device))
    return optimizers
