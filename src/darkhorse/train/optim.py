"""Optimizers: AdamW for everything, or Muon for weight matrices plus AdamW/Lion for the rest.

Muon (orthogonalised momentum) suits hidden weight matrices; embeddings, the output head, norms
and other 1-D parameters keep an element-wise optimizer, as nanochat and Kimi's Moonlight do.
Buffers (e.g. a MoE routing bias) are never parameters, so they never reach an optimizer.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn

from darkhorse.config import TrainConfig
from darkhorse.model.moe import Router

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, as torch's Muon defaults
LION_BETAS = (0.9, 0.99)  # Chen et al. (2023), as the nanochat-train recipe uses


def loss_of(closure: Callable[[], float] | None) -> float | None:
    """What `step(closure)` returns under torch's optimizer protocol: the closure's loss, with grad on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


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
        loss = loss_of(closure)
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


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024): momentum orthogonalised by a Newton-Schulz iteration, for 2-D weight
    matrices and 3-D expert stacks `[experts, out, in]` (one matrix per expert, all of a stack in one
    batched iteration, as are all matrices of one shape). With `ns_dtype` bf16, torch.optim.Muon's update
    (a lone matrix's bit for bit, batched ones up to bf16 rounding), which takes 2-D matrices only.

    Under FSDP the parameters are DTensor shards: a stack, sharded by experts, is orthogonalised where
    it lies (whole experts on each rank); a matrix, sharded by rows, is gathered whole, orthogonalised
    and cut back to this rank's rows. One momentum per parameter (a stack's has its shape)."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        lr: float = 0.02,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        self.ns_dtype = ns_dtype  # not a group setting: a checkpoint resumes on a machine that picks another
        super().__init__(params, defaults)
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim not in (2, 3):
                    raise ValueError(f"Muon takes matrices and expert stacks, not a {param.ndim}-D parameter")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = loss_of(closure)
        for group in self.param_groups:
            # matrices of one shape share one batched iteration: a small model's many small Newton-Schulz
            # calls cost more in overhead than in arithmetic (genesis-demo's Muon step 20 -> 16 ms on CPU)
            same_shape: dict[object, list[tuple[nn.Parameter, torch.Tensor]]] = {}
            ns = group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - group["momentum"])
                update = param.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                alone = update.ndim == 3 or _is_dtensor(update)  # a stack is batched already; a shard is FSDP's
                same_shape.setdefault(id(param) if alone else update.shape, []).append((param, update))
            for members in same_shape.values():
                if len(members) == 1:
                    updates = [_orthogonalised(members[0][1], *ns)]
                else:
                    updates = orthogonalise(torch.stack([update for _, update in members]), *ns).unbind(0)
                for (param, _), update in zip(members, updates, strict=True):
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                    scale = muon_lr_scale(group["adjust_lr_fn"], param.shape[-2:])
                    param.add_(update, alpha=-scale * group["lr"])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Also a checkpoint from before stacks were parameters of their own (one entry per expert)."""
        params = [param for group in self.param_groups for param in group["params"]]
        super().load_state_dict(_stack_expert_entries(state_dict, params))


def _stack_expert_entries(state_dict: dict, params: list[torch.Tensor]) -> dict:
    """`state_dict` with each 3-D parameter's per-expert entries (how darkhorse saved Muon's state
    until 2026-11-30) stacked into one; unchanged when it has one entry per parameter already."""
    per_expert = sum(p.shape[0] if p.ndim == 3 else 1 for p in params)
    groups = state_dict["param_groups"]
    if per_expert == len(params) or len(groups) != 1 or len(groups[0]["params"]) != per_expert:
        return state_dict  # the old layout had one group; torch's load_state_dict refuses other mismatches
    (group,) = groups
    entries, old = {}, 0
    for index, param in enumerate(params):
        count = param.shape[0] if param.ndim == 3 else 1
        rows = [state_dict["state"].get(old + i) for i in range(count)]
        old += count
        if rows[0] is not None:
            stacked = {"momentum_buffer": torch.stack([row["momentum_buffer"] for row in rows])}
            entries[index] = stacked if param.ndim == 3 else rows[0]
    return {"state": entries, "param_groups": [{**group, "params": list(range(len(params)))}]}


def _is_dtensor(tensor: torch.Tensor) -> bool:
    # torch.distributed.tensor takes ~0.5 s to import: only FSDP, which has loaded it, makes DTensors
    distributed_tensor = sys.modules.get("torch.distributed.tensor")
    return distributed_tensor is not None and isinstance(tensor, distributed_tensor.DTensor)


def _orthogonalised(
    update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """`orthogonalise` for a plain tensor or an FSDP shard (see `Muon`)."""
    if not _is_dtensor(update):
        return orthogonalise(update, coefficients, steps, eps, dtype)
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, placements = update.device_mesh, update.placements
    if update.ndim == 3 and all(p in (Shard(0), Replicate()) for p in placements):  # whole experts here
        local = orthogonalise(update.to_local(), coefficients, steps, eps, dtype).contiguous()
        return DTensor.from_local(local, mesh, placements, shape=update.shape, stride=update.stride())
    whole = orthogonalise(update.full_tensor(), coefficients, steps, eps, dtype).contiguous()
    return DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim).redistribute(mesh, placements)


def orthogonalise(
    update: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration toward the nearest (semi-)orthogonal matrix, in `dtype`, over
    the last two dims of `update` (a batch of matrices at once). Each matrix is first scaled to unit
    Frobenius norm; wide matrices are iterated as they are, tall ones transposed."""
    a, b, c = coefficients
    tall = update.size(-2) > update.size(-1)
    x = update.to(dtype)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    multiply_add = torch.baddbmm if x.ndim == 3 else torch.addmm
    for _ in range(steps):
        gram = x @ x.mT
        x = multiply_add(x, multiply_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def newton_schulz_dtype(precision: str, device: torch.device) -> torch.dtype:
    """train.muon_precision as a dtype: `auto` is bf16 (torch's Muon) where bf16 matmuls run natively (CUDA,
    CPUs with AVX512-BF16 or AMX) and fp32 elsewhere: on an AVX2 CPU a bf16 matmul is emulated, 20-50x
    slower than fp32's (genesis-demo's Muon step 763 against 32 ms, with oneDNN held to AVX2 on a Xeon)."""
    if precision != "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        native = native or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if native else torch.float32
    return torch.float32


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


def _element_wise_groups(embeddings: list, head: list, routers: list, vectors: list, train: TrainConfig) -> list[dict]:
    """Embeddings and head at their own lr (train.embedding_lr, train.head_lr; 0 = train.lr) and routers at
    train.router_lr, decayed; 1-D params at train.lr, undecayed. Empty groups are left out."""
    decay = {"weight_decay": train.weight_decay}
    groups = [
        {"params": embeddings, "lr": train.embedding_lr or train.lr, **decay},
        {"params": head, "lr": train.head_lr or train.lr, **decay},
        {"params": routers, "lr": train.router_lr, **decay},
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
    embeddings, an untied head and the MoE routers take their own lr when train.embedding_lr /
    train.head_lr / train.router_lr give one (the routers then on the element-wise optimizer).
    """
    hidden, embeddings, head, vectors = split_parameters(model)
    routers: list[nn.Parameter] = []
    if train.router_lr > 0:  # a router is a small classifier: its own lr, off Muon's orthogonalised steps
        router_ids = {id(m.weight) for m in model.modules() if isinstance(m, Router)}
        routers = [p for p in hidden if id(p) in router_ids]
        hidden = [p for p in hidden if id(p) not in router_ids]
    groups = _element_wise_groups(embeddings, head, routers, vectors, train)
    if train.optimizer == "adamw":
        if hidden:
            groups.insert(0, {"params": hidden, "lr": train.lr, "weight_decay": train.weight_decay})
        return [_adamw(groups, train, device)]

    optimizers: list[torch.optim.Optimizer] = []
    if hidden:
        ns_dtype = newton_schulz_dtype(train.muon_precision, device)
        optimizers.append(
            Muon(hidden, lr=train.muon_lr, weight_decay=train.weight_decay, adjust_lr_fn="original", ns_dtype=ns_dtype)
        )
    if groups:
        if train.scalar_optimizer == "lion":
            optimizers.append(Lion(groups, lr=train.lr))
        else:
            optimizers.append(_adamw(groups, train, device))
    return optimizers
