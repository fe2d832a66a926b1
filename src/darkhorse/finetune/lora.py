"""LoRA for darkhorse models, applied from outside (torchtitan's pattern): the model code is unchanged.

Each targeted module keeps its class's forward and its own weights (same parameter objects, same
state-dict names) and becomes a LoRA subclass that adds `scaling * B(A(dropout(x)))`:

    nn.Linear (attention, dense MLP, shared experts)   lora_A [r, in],  lora_B [out, r]
    RoutedExperts (3-D stacks [E, out, in])             {proj}_lora_A [E, r, in], {proj}_lora_B [E, out, r]
                                                        for proj in gate_proj, up_proj, down_proj
    Router ([E, D], logits in fp32)                     lora_A [r, D], lora_B [E, r]

scaling = alpha / r, B starts at zero (the model starts as the base), A as nn.Linear's default.
The expert term runs as two grouped matmuls over the tokens each expert received (gate and up, which
read the same rows, share one for their A factors), so no [E, out, in] delta is ever materialised,
unlike PEFT's ParamWrapper. Without dropout the whole expert SwiGLU, base and LoRA, is one autograd
node (`_LoRASwiGLUExperts`) over the frozen gate and up stacks held as one [E, 2I, D] tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from darkhorse.errors import DarkhorseError
from darkhorse.model.layers import SwiGLU
from darkhorse.model.moe import MoE, RoutedExperts, Router, grouped_matmul, grouped_mm_supported

GROUPS = ("attention", "shared_experts", "routed_experts", "router", "dense_mlp")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# MLA decodes with kv_b_proj's weight absorbed into the queries (it reads `.weight` directly), so a
# LoRA there would be skipped while generating; it is left out of the attention group.
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa")


@dataclass(frozen=True)
class LoRASpec:
    """What to adapt and how: `r` for attention and dense MLPs, `expert_r` for routed and shared
    experts, `router_r` for the routers; one `alpha` (scaling alpha / r per group, as PEFT).
    Empty `targets` means the architecture's defaults (`for_model`)."""

    targets: tuple[str, ...] = ()
    r: int = 16
    expert_r: int = 16
    router_r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("r", "expert_r", "router_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                flag = {"r": "--lora-r", "expert_r": "--expert-lora-r", "router_r": "--router-lora-r"}[name]
                raise DarkhorseError(f"{flag} must be a positive integer, got {value}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise DarkhorseError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise DarkhorseError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in GROUPS]
        if unknown:
            raise DarkhorseError(
                f"--lora-targets: unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}"
            )

    def for_model(self, model: nn.Module) -> LoRASpec:
        """This spec with the architecture's default targets filled in when none were given."""
        return self if self.targets else replace(self, targets=default_targets(model))

    def rank(self, group: str) -> int:
        return {"routed_experts": self.expert_r, "shared_experts": self.expert_r, "router": self.router_r}.get(
            group, self.r
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """Attention plus the FFN's parts: router and routed experts for MoE models, the MLP for dense ones."""
    moe = any(isinstance(m, MoE) for m in model.layers.modules())
    return ("attention", "router", "routed_experts") if moe else ("attention", "dense_mlp")


class _LoRA:
    """Mixin state shared by the LoRA subclasses."""

    lora_scaling: float
    lora_group: str

    def _init_lora(self, group: str, r: int, alpha: float, dropout: float) -> None:
        self.lora_group = group
        self.lora_r = r
        self.lora_scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @staticmethod
    def _factors(experts: int | None, r: int, fan_in: int, fan_out: int, like: torch.Tensor):
        lead = () if experts is None else (experts,)
        a = torch.empty(*lead, r, fan_in, device=like.device, dtype=torch.float32)
        nn.init.uniform_(a, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))  # nn.Linear's (kaiming a=sqrt(5))
        b = torch.zeros(*lead, fan_out, r, device=like.device, dtype=torch.float32)
        return nn.Parameter(a), nn.Parameter(b)


class LoRALinear(nn.Linear, _LoRA):
    def init_lora(self, group: str, r: int, alpha: float, dropout: float) -> None:
        self._init_lora(group, r, alpha, dropout)
        self.lora_A, self.lora_B = self._factors(None, r, self.in_features, self.out_features, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = F.linear(flat, self.weight, self.bias)
        low = F.linear(self.lora_dropout(flat), self.lora_A.to(out.dtype))
        # B's product, its scaling and the sum in one GEMM, in place on the base output (which the base
        # matmul's backward does not keep): no [T, out] temporaries besides `out` itself.
        out.addmm_(low.to(out.dtype), self.lora_B.to(out.dtype).t(), alpha=self.lora_scaling)
        return out.view(*x.shape[:-1], out.shape[-1])


class LoRARouter(Router, _LoRA):
    def init_lora(self, group: str, r: int, alpha: float, dropout: float) -> None:
        self._init_lora(group, r, alpha, dropout)
        experts, dim = self.weight.shape
        self.lora_A, self.lora_B = self._factors(None, r, dim, experts, self.weight)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().router_logits(x)  # fp32, or autocast's dtype under autocast
        low = F.linear(self.lora_dropout(x).float(), self.lora_A).to(logits.dtype)
        return logits.addmm_(low, self.lora_B.to(logits.dtype).t(), alpha=self.lora_scaling)


class LoRAExperts(RoutedExperts, _LoRA):
    def init_lora(self, group: str, r: int, alpha: float, dropout: float) -> None:
        self._init_lora(group, r, alpha, dropout)
        for name in EXPERT_PROJECTIONS:
            weight = getattr(self, name)
            experts, fan_out, fan_in = weight.shape
            a, b = self._factors(experts, r, fan_in, fan_out, weight)
            self.register_parameter(f"{name}_lora_A", a)
            self.register_parameter(f"{name}_lora_B", b)
        # The frozen gate and up stacks become two halves of one [E, 2I, D] stack (same parameters,
        # names and values; no extra copy), so the fused forward runs one grouped matmul for both; the
        # down stack is held transposed ([E, I, D] in memory), where its forward GEMM runs ~25 % faster
        # on CPU and its input-gradient one ~15 % slower.
        with torch.no_grad():
            stacked = torch.cat([self.gate_proj, self.up_proj], dim=1)
            hidden = self.gate_proj.shape[1]
            self.gate_proj.data, self.up_proj.data = stacked[:, :hidden], stacked[:, hidden:]
            self.down_proj.data = self.down_proj.transpose(1, 2).contiguous().transpose(1, 2)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool | None = None) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        gate_up = self._gate_up_stack()
        if gate_up is None or use_grouped_mm is False or not isinstance(self.lora_dropout, nn.Identity):
            return super().forward(x, counts, use_grouped_mm)
        dtype = x.dtype
        factors = [getattr(self, f"{name}_lora_{ab}").to(dtype) for name in EXPERT_PROJECTIONS for ab in "AB"]
        a_gate, b_gate, a_up, b_up, a_down, b_down = factors
        shapes = [(2 * self.lora_r, x.shape[1]), gate_up.shape[1:], self.down_proj.shape[1:], a_down.shape[1:]]
        if not all(grouped_mm_supported(x.device, dtype, *shape) for shape in shapes):
            return super().forward(x, counts, use_grouped_mm)
        offsets = counts.cumsum(0).to(torch.int32)
        a_gate_up = torch.cat([a_gate, a_up], dim=1)
        return _LoRASwiGLUExperts.apply(
            x, offsets, gate_up.to(dtype), self.down_proj.to(dtype), a_gate_up, b_gate, b_up, a_down, b_down,
            self.lora_scaling,
        )  # fmt: skip

    def _gate_up_stack(self) -> torch.Tensor | None:
        """[E, 2I, D]: gate_proj and up_proj read as one stack, while they are still the two halves of
        the one `init_lora` made (a later `.to(dtype)` gives each its own storage again); else None."""
        gate, up = self.gate_proj, self.up_proj
        experts, hidden, dim = gate.shape
        strides = (2 * hidden * dim, dim, 1)
        if not (
            gate.stride() == up.stride() == strides
            and gate.untyped_storage().data_ptr() == up.untyped_storage().data_ptr()
            and up.storage_offset() == gate.storage_offset() + hidden * dim
        ):
            return None
        return gate.detach().as_strided((experts, 2 * hidden, dim), strides)

    def project(
        self, name: str, x: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool | None = None
    ) -> torch.Tensor:
        low = grouped_matmul(self.lora_dropout(x), getattr(self, f"{name}_lora_A"), counts)
        return self._plus_lora(name, x, low, counts, use_grouped_mm)

    def gate_up(
        self, x: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # One grouped matmul for both A factors ([E, 2r, in]) over the rows gate and up share, so the
        # backward also runs one input-gradient and one A-gradient GEMM for the pair instead of two each.
        a = torch.cat([self.gate_proj_lora_A, self.up_proj_lora_A], dim=1)
        low_gate, low_up = grouped_matmul(self.lora_dropout(x), a, counts).split(self.lora_r, dim=1)
        return (
            self._plus_lora("gate_proj", x, low_gate, counts, use_grouped_mm),
            self._plus_lora("up_proj", x, low_up, counts, use_grouped_mm),
        )

    def _plus_lora(
        self, name: str, x: torch.Tensor, low: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool | None
    ) -> torch.Tensor:
        """The base projection plus B's product of `low` (x's A product, [N, r])."""
        out = super().project(name, x, counts, use_grouped_mm)
        # Scaled at rank r ([N, r]), summed in place into the base output (its backward does not keep it).
        low = low * self.lora_scaling
        return out.add_(grouped_matmul(low, getattr(self, f"{name}_lora_B"), counts).to(out.dtype))


def _rows_times(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows grouped by expert times weight[e] ([E, K, out], K = x's columns): [N, K] -> [N, out]."""
    return torch._grouped_mm(x, weight, offs=offsets)


def _per_expert_outer(left: torch.Tensor, right: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per expert, left's rows transposed times right's rows: [N, a], [N, b] -> [E, a, b] (a weight gradient)."""
    return torch._grouped_mm(left.t(), right, offs=offsets)


class _LoRASwiGLUExperts(torch.autograd.Function):
    """The routed experts' SwiGLU with LoRA on gate, up and down as one autograd node.

    Same arithmetic as `RoutedExperts.forward` plus the `LoRAExperts` terms, with less around it: gate and
    up come from one grouped matmul over the stacked [E, 2I, D] weights, so the backward's input gradient
    of both is one GEMM with K = 2I (not two and a sum); SwiGLU's backward writes d(gate|up) into one
    [N, 2I] tensor; only x, the [N, 2I] gate|up output, the [N, I] SwiGLU output and the rank-r products
    are kept (autograd kept silu(gate) and up as well); the frozen stacks get no gradient work at all.
    """

    @staticmethod
    def forward(ctx, x, offsets, gate_up, down, a_gate_up, b_gate, b_up, a_down, b_down, scaling):
        hidden, r = b_gate.shape[1], b_gate.shape[2]
        gu = _rows_times(x, gate_up.transpose(1, 2), offsets)
        low = _rows_times(x, a_gate_up.transpose(1, 2), offsets).mul_(scaling)
        low_gate, low_up = low[:, :r].contiguous(), low[:, r:].contiguous()  # [N, r] each: tiny
        gate, up = gu[:, :hidden], gu[:, hidden:]
        gate.add_(_rows_times(low_gate, b_gate.transpose(1, 2), offsets))
        up.add_(_rows_times(low_up, b_up.transpose(1, 2), offsets))
        h = torch.ops.aten.silu.out(gate, out=torch.empty_like(up)).mul_(up)
        low_down = _rows_times(h, a_down.transpose(1, 2), offsets).mul_(scaling)
        lows = (low_gate, low_up, low_down)
        out = _rows_times(h, down.transpose(1, 2), offsets)
        out.add_(_rows_times(low_down, b_down.transpose(1, 2), offsets))
        ctx.save_for_backward(x, offsets, gate_up, down, a_gate_up, b_gate, b_up, a_down, b_down, gu, h, *lows)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, d_out):
        x, offsets, gate_up, down, a_gate_up, b_gate, b_up, a_down, b_down, gu, h, *lows = ctx.saved_tensors
        low_gate, low_up, low_down = lows
        need = ctx.needs_input_grad
        hidden, scaling = b_gate.shape[1], ctx.scaling
        d_out = d_out.contiguous()
        # down: out = h @ W_down + s * (h @ A_down) @ B_down
        d_b_down = _per_expert_outer(d_out, low_down, offsets) if need[8] else None
        d_low_down = _rows_times(d_out, b_down, offsets).mul_(scaling)
        d_a_down = _per_expert_outer(d_low_down, h, offsets) if need[7] else None
        d_h = _rows_times(d_out, down, offsets).add_(_rows_times(d_low_down, a_down, offsets))
        # SwiGLU: h = silu(gate) * up. Its two gradients overwrite the saved gate|up output (dead after
        # this), with h's memory (read for the last time above) as the one [N, I] scratch: the
        # backward allocates no [N, 2I] or [N, I] tensor here. (A second backward through this node would
        # find its saved tensors modified and raise, as for any in-place use of a saved tensor.)
        gate, up = gu[:, :hidden], gu[:, hidden:]
        d_gu, d_gate, d_up = gu, gate, up
        d_h_up = torch.mul(d_h, up, out=h)
        torch.ops.aten.silu.out(gate, out=d_up).mul_(d_h)
        torch.ops.aten.silu_backward.grad_input(d_h_up, gate, grad_input=d_gate)
        # gate and up: gu = x @ W_gate_up + s * [(x @ A_gate) @ B_gate | (x @ A_up) @ B_up]
        d_b_gate = _per_expert_outer(d_gate, low_gate, offsets) if need[5] else None
        d_b_up = _per_expert_outer(d_up, low_up, offsets) if need[6] else None
        d_low = torch.cat([_rows_times(d_gate, b_gate, offsets), _rows_times(d_up, b_up, offsets)], 1).mul_(scaling)
        d_a_gate_up = _per_expert_outer(d_low, x, offsets) if need[4] else None
        d_x = None
        if need[0]:
            d_x = _rows_times(d_gu, gate_up, offsets).add_(_rows_times(d_low, a_gate_up, offsets))
        return d_x, None, None, None, d_a_gate_up, d_b_gate, d_b_up, d_a_down, d_b_down, None


LORA_CLASSES: dict[type, type] = {nn.Linear: LoRALinear, Router: LoRARouter, RoutedExperts: LoRAExperts}


def target_modules(model: nn.Module, group: str) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module of `group` in the model's decoder layers (MTP modules, which
    only train, are never adapted)."""
    for i, block in enumerate(model.layers):
        ffn = block.ffn
        if group == "attention":
            for child in ATTENTION_LINEARS:
                if isinstance(getattr(block.attn, child, None), nn.Linear):
                    yield f"layers.{i}.attn.{child}", getattr(block.attn, child)
        elif group == "dense_mlp" and isinstance(ffn, SwiGLU):
            for child in EXPERT_PROJECTIONS:
                yield f"layers.{i}.ffn.{child}", getattr(ffn, child)
        elif group == "shared_experts" and isinstance(ffn, MoE) and ffn.shared_experts is not None:
            for child in EXPERT_PROJECTIONS:
                yield f"layers.{i}.ffn.shared_experts.{child}", getattr(ffn.shared_experts, child)
        elif group == "routed_experts" and isinstance(ffn, MoE):
            yield f"layers.{i}.ffn.experts", ffn.experts
        elif group == "router" and isinstance(ffn, MoE):
            yield f"layers.{i}.ffn.gate", ffn.gate


def apply_lora(model: nn.Module, spec: LoRASpec) -> dict[str, list[str]]:
    """Freeze every base parameter and turn the targeted modules into LoRA modules (in place).

    Returns {group: module names}. A requested group that matches nothing is an error (a LoRA that
    trains nothing must not pass silently)."""
    found = {group: list(target_modules(model, group)) for group in spec.targets}
    empty = [group for group, modules in found.items() if not modules]
    if empty:
        kinds = "MoE" if any(isinstance(m, MoE) for m in model.modules()) else "dense"
        raise DarkhorseError(
            f"--lora-targets {', '.join(empty)} matched nothing in this {kinds} model "
            f"(it has: {', '.join(g for g in GROUPS if any(True for _ in target_modules(model, g)))})"
        )
    model.requires_grad_(False)
    for group, modules in found.items():
        for _, module in modules:
            module.__class__ = LORA_CLASSES[type(module)]
            module.init_lora(group, spec.rank(group), spec.alpha, spec.dropout)
    return {group: [name for name, _ in modules] for group, modules in found.items()}


def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, _LoRA))


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every LoRA factor by its model name (`...lora_A`, `...lora_B`, `..._lora_A`, ...)."""
    return {name: p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1].endswith(("lora_A", "lora_B"))}


def trainable_by_group(model: nn.Module) -> dict[str, int]:
    """LoRA parameter count per group (those that matched anything)."""
    counts: dict[str, int] = {}
    for _, module in lora_modules(model):
        own = sum(p.numel() for name, p in module.named_parameters(recurse=False) if "lora_" in name)
        counts[module.lora_group] = counts.get(module.lora_group, 0) + own
    return counts


def set_group_trainable(model: nn.Module, group: str, trainable: bool) -> None:
    for _, module in lora_modules(model):
        if module.lora_group == group:
            for name, p in module.named_parameters(recurse=False):
                if "lora_" in name:
                    p.requires_grad_(trainable)


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * B @ A in fp32: [out, in] from A [r, in] and B [out, r], or one per expert, [E, out, in],
    from A [E, r, in] and B [E, out, r]. The one delta rule: saving a merged router and `darkhorse merge` use it."""
    return scaling * (b.float() @ a.float())


@torch.no_grad()
def merged_weight(module: LoRALinear | LoRARouter) -> torch.Tensor:
    """The base weight plus this module's LoRA delta, fp32 (a router saved whole)."""
    return module.weight.float() + lora_delta(module.lora_A, module.lora_B, module.lora_scaling)
