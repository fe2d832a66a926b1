"""Tokenize raw text, domain-tagged or chat data into a prepared directory that `darkhorse train` reads.

Inputs (detected by extension and content): .txt (documents split on blank lines, or one file = one
document with --txt-documents file), and .jsonl / .json / .parquet records of the forms
  {"text": ...}  {"domain": "code", "text": ...}  {"messages": [{"role", "content"}], "reasoning"?: ...}
  {"conversations": [{"from", "value"}]} (ShareGPT, OpenHermes-2.5; OpenThoughts with "system")
  {"instruction", "input"?, "output"} (Open-Platypus).
A directory as --input means every such file inside it. Chat records are rendered as
  <|bos|><|system|>…<|/system|><|user|>…<|/user|><|think|>…<|/think|><|assistant|>…<|/assistant|><|eos|>

Writes OUT/tokenizer.json, train.bin and val.bin (uint32 token ids), train.domains.bin and val.domains.bin
(uint8 domain id per token) and meta.json. A new byte-level BPE tokenizer is trained unless --tokenizer
gives one. OUT must not exist unless --force, which replaces only a directory prepare wrote. Memory stays
bounded however long a document is: one longer than 1 Mi characters is tokenized in pieces cut at spaces
(same ids), using about 0.6 GiB plus a few copies of that document's text.

examples:
  darkhorse prepare --input data/train.jsonl --out data/prepared
  darkhorse prepare --input books/ chat.jsonl --out data/mix --vocab-size 8192 --val-fraction 0.01
  darkhorse prepare --input more.jsonl --tokenizer data/prepared/tokenizer.json --out data/more"""

from __future__ import annotations

import argparse
import time
from typing import Any

from darkhorse.config import number_arg

HELP = "tokenize text, domain-tagged or chat data (.txt/.jsonl/.json/.parquet) into a prepared directory"


TXT_DOCUMENTS = ("paragraphs", "file")  # = darkhorse.data.readers.TXT_SPLITS (not imported: keeps --help fast)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Numeric defaults live in darkhorse.data.prepare.prepare(); None here means "use them", and the
    # figures quoted in the help are checked against them by tests/data/test_cli.py.
    parser.add_argument(
        "--input", nargs="+", action="extend", required=True, metavar="PATH", help="input files or directories"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="prepared directory to create")
    parser.add_argument(
        "--vocab-size",
        type=number_arg(int, gt=0),
        metavar="N",
        help="BPE vocabulary to train, special tokens included (default 4096)",
    )
    parser.add_argument(
        "--tokenizer", metavar="FILE", help="reuse this tokenizer.json instead of training one (ignores --vocab-size)"
    )
    parser.add_argument(
        "--val-fraction",
        type=number_arg(float, ge=0, lt=1),
        metavar="F",
        help="share of documents held out for validation, picked by a hash of each document (default 0.02)",
    )
    parser.add_argument(
        "--txt-documents",
        choices=TXT_DOCUMENTS,
        default=TXT_DOCUMENTS[0],
        help="what one document is in .txt inputs: a blank-line separated paragraph, or the whole file",
    )
    parser.add_argument(
        "--tokenizer-sample-mb",
        type=number_arg(float, gt=0),
        metavar="MB",
        help="train the tokenizer on at most this many MiB of text (default 128)",
    )
    parser.add_argument("--skip-bad", action="store_true", help="count, report and skip malformed records")
    parser.add_argument("--force", action="store_true", help="replace OUT if it is an earlier prepared dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from darkhorse.data.prepare import prepare

    console = Console(stderr=True)
    started = time.perf_counter()
    options = {
        "vocab_size": args.vocab_size,
        "val_fraction": args.val_fraction,
        "tokenizer_sample_bytes": None if args.tokenizer_sample_mb is None else int(args.tokenizer_sample_mb * 2**20),
    }
    data = prepare(
        args.input,
        args.out,
        tokenizer=args.tokenizer,
        force=args.force,
        skip_bad=args.skip_bad,
        txt_split=args.txt_documents,
        progress=not args.quiet,
        console=console,
        **{name: value for name, value in options.items() if value is not None},
    )
    if not args.quiet:
        print_summary(console, data.meta, args.out, time.perf_counter() - started)
    return 0


def print_summary(console: Any, meta: dict[str, Any], out: str, seconds: float) -> None:
    from rich.table import Table

    megabytes = sum(entry["bytes"] for entry in meta["inputs"]) / 1e6

    table = Table(title=f"prepared {out} (vocab {meta['vocab_size']})")
    for column in ("split", "domain", "documents", "tokens"):
        table.add_column(column, justify="left" if column in ("split", "domain") else "right")
    for split, info in meta["splits"].items():
        table.add_row(split, "all", f"{info['documents']:,}", f"{info['tokens']:,}")
        for domain, counts in info["domains"].items():
            table.add_row("", domain, f"{counts['documents']:,}", f"{counts['tokens']:,}")
    console.print(table)
    for skipped in meta.get("skipped", []):
        console.print(f"[yellow]skipped {skipped['count']} bad records in {skipped['path']}[/yellow]")
        for example in skipped["examples"]:
            console.print(f"  {example}")
    console.print(f"{megabytes:,.1f} MB of input in {seconds:.1f} s ({megabytes / max(seconds, 1e-9):.1f} MB/s)")
    console.print(next_step(meta, out), markup=False, highlight=False, soft_wrap=True)


def next_step(meta: dict[str, Any], out: str) -> str:
    """The train command to run next: a Genesis (MoE) preset for domain-tagged data, whose routing
    report shows which experts each domain uses; the small dense preset otherwise."""
    domains = meta.get("domains", [])
    if len(domains) > 1:
        return (
            f"next: darkhorse train --preset genesis-tiny --data {out} --out runs/genesis   "
            f"({len(domains)} domains: the MoE run ends with a domain x expert routing report)"
        )
    return f"next: darkhorse train --preset tiny-cpu --data {out} --out runs/tiny"
