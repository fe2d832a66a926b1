"""Count parameters, FLOPs and memory of a config without allocating it.

The model is built on PyTorch's meta device, so even the 500B presets are counted from the
real module tree in a second and no memory. --world-size/--parallel/--expert-parallel size the run per
device (train/plan.py), and --device-memory says whether it fits:

  darkhorse params --preset genesis-500b --world-size 128 --parallel fsdp --expert-parallel 8 --device-memory 80GiB"""

from __future__ import annotations

import argparse

from darkhorse.commands.common import add_config_arguments, config_from_args
from darkhorse.config import number_arg

HELP = "parameters, FLOPs per token, KV cache and training memory (per device for a layout) of a preset or config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default_preset="tiny-cpu")
    parser.add_argument(
        "--context", type=number_arg(int, gt=0), default=131072, help="context length for the KV-cache figure"
    )
    parser.add_argument(
        "--world-size", type=number_arg(int, gt=0), default=1, metavar="N", help="ranks to size the run for"
    )
    parser.add_argument(
        "--parallel", choices=["none", "ddp", "fsdp"], help="how the ranks split the model (default: train.parallel)"
    )
    parser.add_argument(
        "--expert-parallel",
        type=number_arg(int, gt=0),
        default=1,
        metavar="K",
        help="ranks each MoE layer's experts are split over",
    )
    parser.add_argument(
        "--device-memory", metavar="SIZE", help="memory of one device, e.g. 80GiB: says whether the run fits"
    )


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from darkhorse.model import Transformer
    from darkhorse.train.memory import estimate_training_memory
    from darkhorse.train.plan import MEASURED_MFU, Layout, parse_bytes, plan_layout

    config = config_from_args(args)
    with torch.device("meta"):
        model = Transformer(config.model)
    total = model.num_params()
    active = model.num_active_params()
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and p is not model.embed.weight)
    memory = estimate_training_memory(config, total, matrices)
    kv_values = model.kv_cache_values_per_token()

    table = Table(title=f"{config.name or 'config'}: {config.description}".rstrip(": "), show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("total parameters", f"{total:,} ({_human(total)})")
    if model.mtp:
        mtp = sum(p.numel() for p in model.mtp.parameters())
        table.add_row("  of which MTP modules (training only)", f"{mtp:,} ({_human(mtp)})")
    table.add_row("active parameters per token", f"{active:,} ({_human(active)})")
    table.add_row("embedding parameters", f"{model.embed.weight.numel():,}")
    table.add_row(
        f"training FLOPs per token (seq {config.train.seq_len})",
        _human(model.flops_per_token(config.train.seq_len)),
    )
    table.add_row("KV cache per token (bf16)", f"{kv_values * 2:,} bytes")
    table.add_row(f"KV cache at {args.context:,} tokens (bf16)", _gib(kv_values * 2 * args.context))
    if config.model.attention == "mla":
        full = sum(layer.attn.uncompressed_cache_values_per_token() for layer in model.layers)
        table.add_row(
            "  GQA of the same width (n_heads K/V heads)",
            f"{full * 2:,} bytes, {_gib(full * 2 * args.context)} ({full / kv_values:.1f}x)",
        )
    table.add_row("weights (fp32 master)", _gib(memory.weights))
    table.add_row("gradients (fp32)", _gib(memory.grads))
    table.add_row(f"optimizer state ({config.train.optimizer})", _gib(memory.optimizer))
    table.add_row(
        f"activations (micro-batch {config.train.batch_size} x {config.train.seq_len}, {config.train.dtype})",
        _gib(memory.activations),
    )
    table.add_row("training memory, one device", _gib(memory.total))
    layout = Layout(args.world_size, args.parallel or config.train.parallel, args.expert_parallel)
    plan = plan_layout(config, layout)
    table.add_section()
    table.add_row(f"layout: {layout.describe()}", f"global batch {plan.global_tokens_per_step:,} tokens per step")
    table.add_row("  weights + gradients + optimizer per device", _gib(plan.weights + plan.grads + plan.optimizer))
    if plan.gathered:
        table.add_row("  gathered blocks (FSDP, current + prefetched)", _gib(plan.gathered))
    table.add_row("  activations per device", _gib(plan.activations))
    table.add_row("training memory per device", _gib(plan.total))
    if layout.world_size > 1 or layout.expert_parallel > 1:
        table.add_row("  sent per device per step", _gib(plan.comm_bytes))
    table.add_row(
        f"expected tokens/s on H100s (measured {MEASURED_MFU:.0%} MFU, no communication)", f"{plan.tokens_per_s():,.0f}"
    )
    if args.device_memory:
        device_memory = parse_bytes(args.device_memory)
        verdict = "fits" if plan.total <= device_memory else "does NOT fit"
        table.add_row(f"fits {_gib(device_memory)} per device?", f"{verdict} ({plan.total / device_memory:.0%})")
    Console().print(table)
    return 0
