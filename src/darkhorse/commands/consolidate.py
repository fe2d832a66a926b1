"""Turn a sharded checkpoint (an FSDP run's step-NNNNNN/ or final/) into today's single-file checkpoint.

  darkhorse consolidate runs/big/final                       -> runs/big/final-consolidated
  darkhorse consolidate runs/big/step-000400 --out ckpt/big  then export, merge, generate, chat, eval

An FSDP run (train.parallel=fsdp) saves each rank's shards of the weights and optimizer state with
torch.distributed.checkpoint; training resumes from them at any world size. Everything that only
reads weights takes one model.safetensors: this writes it (with meta.json and the tokenizer, no
trainer state), in one process, holding the whole model in memory once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "turn a sharded (FSDP) checkpoint into a single-file one for export, merge and inference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, metavar="CKPT_DIR", help="sharded checkpoint dir (holds shards/)")
    parser.add_argument("--out", type=Path, help="output checkpoint dir (default: CKPT_DIR-consolidated)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from darkhorse.train.sharded import consolidate

    out = args.out or args.checkpoint.with_name(args.checkpoint.name + "-consolidated")
    print(f"wrote {consolidate(args.checkpoint, out, force=args.force)}")
    return 0
