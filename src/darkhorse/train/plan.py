"""Sizing a run across devices before anything is built: memory per device, communication per step
and expected speed for a layout (ranks, none/ddp/fsdp, expert parallelism).

`darkhorse params --world-size 64 --parallel fsdp --expert-parallel 8 --device-memory 80GiB` prints
it, `train` checks its own layout with it before it builds the model, and
`python -m darkhorse.train.plan > docs/scale.md` writes the plan for the largest presets. Parameters
are counted on the meta device (no memory); `estimate_training_memory` gives the one-device figures
that sharding divides:

- none/ddp: every rank holds the whole model (with expert parallelism K, 1/K of the routed experts);
  DDP all-reduces fp32 gradients once per step: 2 (W-1)/W x 4 bytes per parameter.
- fsdp (ZeRO-3): weights, gradients and optimizer state are 1/W per rank, plus the gathered block
  (and the next one, prefetched) in the compute dtype. Per micro-batch the weights are all-gathered
  twice (forward, backward) and per step the gradients reduce-scattered in fp32.
- expert parallelism K: each MoE layer sends its token slots to the ranks holding their experts and
  back, in forward and backward (and the forward again under gradient checkpointing): all-to-all.

Speed is the single-GPU MFU we measured on an H100 (docs/benchmarks.md: 32% compiled, forge-nano)
times the device's bf16 peak, per device; communication is shown as bytes and, at an assumed
per-GPU network bandwidth, as a share of the step (it overlaps compute only partly).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass

import torch

from darkhorse.config import RunConfig, load_run_config
from darkhorse.errors import DarkhorseError
from darkhorse.model import Transformer
from darkhorse.model.moe import RoutedExperts
from darkhorse.train.memory import GIB, MemoryEstimate, estimate_training_memory

MEASURED_MFU = 0.32  # forge-nano on one H100, torch.compile, docs/benchmarks.md "On an H100"
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s (train/peak_flops.py)
NETWORK_BYTES_PER_S = 50e9  # 400 Gb/s InfiniBand per GPU, the usual H100 cluster


@dataclass(frozen=True)
class Layout:
    world_size: int = 1
    parallel: str = "none"
    expert_parallel: int = 1

    def describe(self) -> str:
        ep = f", expert parallel {self.expert_parallel}" if self.expert_parallel > 1 else ""
        return f"{self.world_size} x {self.parallel}{ep}"


@dataclass
class DevicePlan:
    """Bytes per device, communication per optimizer step, and speed, for one layout of one config."""

    layout: Layout
    weights: int
    grads: int
    optimizer: int
    gathered: int  # FSDP: the unsharded block being computed and the prefetched next one
    activations: int
    comm_bytes: int  # sent per device per optimizer step
    flops_per_token: float
    global_tokens_per_step: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.gathered + self.activations

    def estimate(self) -> MemoryEstimate:
        """As `train.memory`'s one-device estimate (gathered blocks counted with the activations)."""
        return MemoryEstimate(self.weights, self.grads, self.optimizer, self.gathered + self.activations)

    def tokens_per_s(self, peak: float = H100_BF16_PEAK, mfu: float = MEASURED_MFU) -> float:
        """All devices together, at the measured single-GPU MFU (communication not counted)."""
        return self.layout.world_size * peak * mfu / self.flops_per_token

    def step_seconds(self, peak: float = H100_BF16_PEAK, mfu: float = MEASURED_MFU) -> tuple[float, float]:
        """(compute, communication) seconds per step per device, the second at NETWORK_BYTES_PER_S."""
        return self.global_tokens_per_step / self.tokens_per_s(peak, mfu), self.comm_bytes / NETWORK_BYTES_PER_S


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '141G', '512MiB' -> bytes (G and GB are taken as GiB, as GPU specs mean them)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise DarkhorseError(f"--device-memory {text!r}: expected a size like 80GiB, 141GB or 24G")
    scale = 1024 ** " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * scale)


def check_layout(config: RunConfig, layout: Layout) -> None:
    """Layouts that cannot run: one line each, before any process builds anything."""
    world, ep = layout.world_size, layout.expert_parallel
    if world < 1 or ep < 1:
        raise DarkhorseError("the world size and expert parallelism must be >= 1")
    if layout.parallel == "none" and world > 1:
        raise DarkhorseError(f"{world} ranks need a parallel layout: ddp or fsdp")
    if ep > 1:
        if config.model.ffn != "moe":
            raise DarkhorseError(f"expert parallelism {ep} needs an MoE model (model.ffn=moe)")
        if world % ep:
            raise DarkhorseError(f"expert parallelism {ep} must divide the world size {world}")
        experts = config.model.moe.n_routed_experts
        if experts % ep:
            raise DarkhorseError(f"expert parallelism {ep} must divide model.moe.n_routed_experts ({experts})")


@dataclass(frozen=True)
class ParamCounts:
    """What sharding divides, counted once per model config (on the meta device)."""

    total: int
    matrices: int  # optimizer state: Muon keeps less for these
    experts: int  # routed experts, which expert parallelism splits
    block_dense: int  # the largest block without its routed experts ...
    block_experts: int  # ... and its routed experts: what FSDP gathers for one block
    moe_layers: int
    flops_per_token: float


def param_counts(config: RunConfig) -> ParamCounts:
    with torch.device("meta"):
        model = Transformer(config.model)

    def experts_in(module: torch.nn.Module) -> int:
        return sum(p.numel() for m in module.modules() if isinstance(m, RoutedExperts) for p in m.parameters())

    largest = max(model.layers, key=lambda block: sum(p.numel() for p in block.parameters()))
    return ParamCounts(
        total=model.num_params(),
        matrices=sum(p.numel() for p in model.parameters() if p.dim() >= 2 and p is not model.embed.weight),
        experts=experts_in(model),
        block_dense=sum(p.numel() for p in largest.parameters()) - experts_in(largest),
        block_experts=experts_in(largest),
        moe_layers=sum(1 for block in model.layers if experts_in(block)),
        flops_per_token=model.flops_per_token(config.train.seq_len),
    )


def plan_layout(config: RunConfig, layout: Layout, counts: ParamCounts | None = None) -> DevicePlan:
    """Per-device memory, communication and speed of training `config` with `layout`."""
    check_layout(config, layout)
    counts = counts or param_counts(config)
    one_device = estimate_training_memory(config, counts.total, counts.matrices)
    train, model_cfg = config.train, config.model
    world, ep = layout.world_size, layout.expert_parallel
    dense, experts = counts.total - counts.experts, counts.experts
    compute_bytes = 2 if train.dtype in ("bf16", "fp16") else 4

    def ring(ranks: float) -> float:  # the share of a collective's payload one rank sends
        return (ranks - 1) / ranks

    if layout.parallel == "fsdp":
        # dense weights are sharded over all ranks; an expert over the world / ep ranks that hold it
        held = dense / world + experts / world
        gathered = 2 * (counts.block_dense + counts.block_experts / ep) * compute_bytes if world > 1 else 0
        per_param = 2 * compute_bytes * train.grad_accum + 4  # two all-gathers per micro-batch, one reduce-scatter
        comm = per_param * (ring(world) * dense + ring(world / ep) * experts / ep)
    else:
        held, gathered = dense + experts / ep, 0
        comm = 2 * 4 * (ring(world) * dense + ring(world / ep) * experts / ep) if layout.parallel == "ddp" else 0.0
    if ep > 1:
        tokens = train.batch_size * train.seq_len * train.grad_accum
        passes = 6 if train.grad_checkpointing else 4  # dispatch + combine, forward + backward (+ recompute)
        slot_bytes = model_cfg.moe.experts_per_token * model_cfg.dim * compute_bytes
        comm += passes * counts.moe_layers * tokens * slot_bytes * ring(ep)
    share = held / counts.total
    return DevicePlan(
        layout=layout,
        weights=int(one_device.weights * share),
        grads=int(one_device.grads * share),
        optimizer=int(one_device.optimizer * share),
        gathered=int(gathered),
        activations=one_device.activations,
        comm_bytes=int(comm),
        flops_per_token=counts.flops_per_token,
        global_tokens_per_step=train.batch_size * train.seq_len * train.grad_accum * world,
    )


def at_world(config: RunConfig, world: int) -> RunConfig:
    """`config` on `world` ranks with the preset's global batch: grad_accum divided by the ranks (>= 1)."""
    accum = max(1, config.train.grad_accum // world)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, grad_accum=accum))


def smallest_fitting_layout(config: RunConfig, device_memory: int, expert_parallel: int) -> DevicePlan | None:
    """The fewest FSDP ranks (powers of two up to 4096) whose per-device plan fits `device_memory`,
    at the config's global batch."""
    counts = param_counts(config)
    for world in (2**exponent for exponent in range(13)):
        if world < expert_parallel:
            continue
        layout = Layout(world, "fsdp" if world > 1 else "none", expert_parallel)
        plan = plan_layout(at_world(config, world), layout, counts)
        if plan.total <= device_memory:
            return plan
    return None


def gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB"


def _markdown_rows(plan: DevicePlan, device_memory: int) -> str:
    compute_s, comm_s = plan.step_seconds()
    fits = "yes" if plan.total <= device_memory else "no"
    return (
        f"| {plan.layout.describe()} | {gib(plan.weights + plan.grads + plan.optimizer)} | {gib(plan.gathered)} | "
        f"{gib(plan.activations)} | {gib(plan.total)} | {fits} | {plan.tokens_per_s():,.0f} | "
        f"{plan.comm_bytes / GIB:,.1f} GiB | {comm_s / (compute_s + comm_s):.0%} |"
    )


def markdown(presets: list[str], device_memory: int) -> str:
    """docs/scale.md: for each preset, the smallest layout that fits, and its neighbours."""
    lines = [
        "# Scaling plan for the largest presets",
        "",
        "Generated by `PYTHONPATH=src python -m darkhorse.train.plan > docs/scale.md` (src/darkhorse/train/plan.py);",
        "do not edit by hand. Figures are per GPU of "
        f"{gib(device_memory)} (H100 80GB), bf16 compute with fp32 master weights, at each preset's own",
        "micro-batch and sequence length, and its global batch (grad_accum divided by the ranks, at least 1).",
        "Every layout is sized with AdamW (Muon keeps less state; under FSDP it also gathers each",
        "matrix's update once a step, not counted here). Expected tokens/s assume the single-H100 MFU we measured",
        f"({MEASURED_MFU:.0%}, docs/benchmarks.md) on every GPU; the communication share assumes "
        f"{NETWORK_BYTES_PER_S / 1e9:.0f} GB/s",
        "per GPU (400 Gb/s InfiniBand) and no overlap with compute, so it is an upper bound. Expert",
        "parallelism with FSDP is sized here; darkhorse trains it with DDP over all ranks only so far (README).",
        "",
        "How to read it: FSDP all-gathers every block's weights twice per micro-batch, so with the presets'",
        "micro-batch of one 4096-token sequence and several micro-batches per step the network, not the GPU,",
        "bounds the step: raise train.batch_size (what fits beside the weights) and lower grad_accum at the",
        "same global batch. Expert parallelism keeps each rank's experts local (a gathered block holds 1/8 of",
        "them) and trades those gathers for all-to-alls of token slots.",
        "",
    ]
    header = (
        "| layout (ranks x parallel) | weights + grads + optimizer | gathered blocks | activations | total | fits | "
        "tokens/s (all GPUs) | sent per GPU per step | comm share |"
    )
    for name in presets:
        config = load_run_config(name, overrides=["train.optimizer=adamw"])
        counts = param_counts(config)
        ep = 8 if config.model.ffn == "moe" else 1
        best = smallest_fitting_layout(config, device_memory, ep)
        worlds = sorted({8, 64, 256, *([best.layout.world_size] if best else [])})
        layouts = [Layout(w, "fsdp", 1) for w in worlds] + [Layout(w, "fsdp", ep) for w in worlds if ep > 1]
        lines += [f"## {name}", "", config.description, ""]
        if best:
            days = config.train.max_steps * sum(best.step_seconds()) / 86400
            lines.append(
                f"Smallest layout that fits: **{best.layout.describe()} GPUs**, {gib(best.total)} per GPU, "
                f"~{best.tokens_per_s():,.0f} tokens/s, {config.train.max_steps:,} steps of "
                f"{best.global_tokens_per_step:,} tokens in ~{days:,.0f} days at that size."
            )
        else:
            lines.append("No layout up to 4096 GPUs fits.")
        lines += ["", header, "|" + "---|" * 9]
        rows = [plan_layout(at_world(config, layout.world_size), layout, counts) for layout in layouts]
        lines += [_markdown_rows(row, device_memory) for row in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print docs/scale.md (the plan for the largest presets)")
    parser.add_argument("--presets", nargs="+", default=["genesis-30b", "genesis-500b"])
    parser.add_argument("--device-memory", default="80GiB")
    args = parser.parse_args(argv)
    print(markdown(args.presets, parse_bytes(args.device_memory)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
