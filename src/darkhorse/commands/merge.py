"""Merge a LoRA adapter into its base model: a standalone checkpoint (or Hugging Face directory).

ADAPTER is a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors, keyed by the base's
Hugging Face names), as `darkhorse finetune` writes to RUN_DIR/final or PEFT's save_pretrained does.
Attention / MLP Linear targets and PEFT's target_parameters on fused expert weights and routers are
merged with PEFT's scaling (alpha/r, rslora, rank_pattern, alpha_pattern): W += scaling * B @ A.

BASE is a darkhorse checkpoint or a Hugging Face model directory. When the adapter carries
darkhorse_adapter.json (finetune writes it), its base is used by default and any --base must have the
same weights (sha256 fingerprint): a different base is refused, naming both. Whole modules PEFT saves
(modules_to_save, e.g. finetune's DeepSeek-style router with its selection bias) replace the base's.
Every adapter key must land on a base tensor of exactly the right shape, and every adapted tensor must
change, or nothing is written.

examples:
  darkhorse merge --adapter runs/moe-lora/final --out runs/moe-merged/final
  darkhorse merge --adapter runs/moe-lora/final --base ./Mixtral-tiny --format hf --out exports/merged-hf"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

HELP = "merge a LoRA adapter (PEFT format) into its base as a standalone checkpoint or HF directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, type=Path, help="adapter dir (e.g. runs/NAME/final)")
    parser.add_argument("--out", required=True, type=Path, help="directory to write the merged model to")
    parser.add_argument(
        "--base", type=Path, help="base checkpoint or HF dir (default: the one darkhorse_adapter.json names)"
    )
    parser.add_argument(
        "--format",
        default="darkhorse",
        choices=("darkhorse", "hf"),
        help="what to write: a darkhorse checkpoint (default) or an hf directory",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--allow-zero-delta", action="store_true", help="merge even if some adapted tensors would not change"
    )


def run(args: argparse.Namespace) -> int:
    from darkhorse.finetune.merge import merge_adapter

    result = merge_adapter(
        args.adapter, args.out, base=args.base, fmt=args.format, force=args.force,
        allow_zero_delta=args.allow_zero_delta,
    )  # fmt: skip
    groups = defaultdict(list)
    for target in result.targets:
        groups[re.sub(r"\.\d+\.", ".*.", target.hf_name)].append(target)
    print(f"base {result.base} (weights {result.fingerprint[:19]})")
    print(f"{'adapted tensor':<56} {'count':>5} {'rank':>5} {'scale':>7} {'|dW|/|W| min':>13} {'max':>9}")
    for name, targets in groups.items():
        ranks = sorted({t.rank for t in targets})
        scales = sorted({t.scaling for t in targets})
        low, high = min(t.relative_delta for t in targets), max(t.relative_delta for t in targets)
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        scale = f"{scales[0]:.3g}" if len(scales) == 1 else "mixed"
        if ranks == [0]:  # a modules_to_save tensor: replaced whole
            rank, scale = "saved", "-"
        print(f"{name:<56} {len(targets):>5} {rank:>5} {scale:>7} {low:>13.3g} {high:>9.3g}")
    if result.zero:
        unchanged = ", ".join(t.hf_name for t in result.zero)
        print(f"warning: {len(result.zero)} adapted tensors did not change: {unchanged}")
    print(f"wrote {args.format} model to {result.out}")
    return 0
