"""Download an instruction dataset from the Hugging Face Hub as chat JSONL that `darkhorse prepare` reads.

Datasets: openhermes-2.5 (teknium/OpenHermes-2.5), open-platypus (garage-bAInd/Open-Platypus),
openthoughts-114k (open-thoughts/OpenThoughts-114k; reasoning traces go to the think block). Records are
streamed, so --max-samples N fetches only N. Each line written is
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}], "reasoning": ...}
to OUT/NAME.jsonl. --from-file converts a local copy (JSON Lines or parquet with the hub's schema) instead.

examples:
  darkhorse download open-platypus --max-samples 5000 --out data
  darkhorse prepare --input data/open-platypus.jsonl --out data/platypus"""

from __future__ import annotations

import argparse

from darkhorse.config import number_arg

HELP = "download OpenHermes-2.5, Open-Platypus or OpenThoughts-114k as chat JSONL"
NAMES = ("openhermes-2.5", "open-platypus", "openthoughts-114k")  # = darkhorse.data.sources.SOURCES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help=f"dataset: {', '.join(NAMES)} (or its hub id)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory for NAME.jsonl")
    parser.add_argument("--max-samples", type=number_arg(int, gt=0), metavar="N", help="keep only the first N records")
    parser.add_argument(
        "--from-file", nargs="+", metavar="FILE", help="convert these local files instead of downloading"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT/NAME.jsonl if it exists")


def run(args: argparse.Namespace) -> int:
    from huggingface_hub.utils import logging as hub_logging

    from darkhorse.data.sources import download

    hub_logging.set_verbosity_error()  # the hub's retry warnings would bury the one-line error
    path, written, skipped = download(
        args.name, args.out, max_samples=args.max_samples, force=args.force, data_files=args.from_file
    )
    print(f"wrote {written:,} conversations to {path}")
    if skipped:
        print(f"skipped {len(skipped)} records that are not conversations, e.g. {skipped[0]}")
    print(f"next: darkhorse prepare --input {path} --out {path.with_suffix('')}")
    return 0
