"""Count parameters, FLOPs and memory of a config without allocating it.

The model is built on PyTorch's meta device, so even the 500B presets are counted from the
real module tree in a second and no memory."""

from __future__ import annotations

import argparse

from darkhorse.commands.common import add_config_arguments, config_from_args
from darkhorse.config import number_arg

HELP = "parameters, FLOPs per token, KV cache and training memory of a preset or config"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default_preset="tiny-cpu")
    parser.add_argument(
        "--context", type=number_arg(int, gt=0), default=131072, help="context length for the KV-cache figure"
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
    table.add_row("training memory per device", _gib(memory.total))
    Console().print(table)
    return 0
