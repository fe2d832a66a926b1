"""Quantize a GGUF file (from `darkhorse export --format gguf`) with llama.cpp's own quantizer.

    darkhorse quantize model-f16.gguf --type Q4_K_M --out model-q4_k_m.gguf --data data/prepared

Types: Q8_0 (8-bit, near lossless), Q6_K, Q5_K_M, Q4_K_M (llama.cpp's K-quant mixes). The input
must be an f32, f16 or bf16 GGUF. K-quants need rows whose length is a multiple of 256: tensors that
do not fit fall back to another type (Q4_K -> Q5_0, Q6_K -> Q8_0, ...); the report reads the written
file back and names them. With --data it also reports the perplexity of the original and the
quantized model on the first --ppl-tokens tokens of DIR/val.bin, both computed from llama.cpp's
logits. The output is written to a temporary file and renamed when complete; an existing --out
is only replaced with --force.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

from darkhorse.config import number_arg

HELP = "quantize a GGUF file to Q8_0, Q6_K, Q5_K_M or Q4_K_M with llama.cpp; report sizes and perplexity"
TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN.gguf", help="f32, f16 or bf16 GGUF file to quantize")
    parser.add_argument("--type", required=True, choices=TYPES, dest="qtype", help="target quantization")
    parser.add_argument("--out", required=True, metavar="OUT.gguf", help="where to write the quantized file")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument(
        "--data", metavar="PREPARED_DIR", help="prepared data dir whose val.bin measures perplexity (before/after)"
    )
    parser.add_argument(
        "--ppl-tokens",
        type=number_arg(int, gt=0),
        default=16384,
        metavar="N",
        help="val tokens to evaluate (default 16384)",
    )
    parser.add_argument(
        "--context", type=number_arg(int, gt=0), default=512, metavar="N",
        help="perplexity window in tokens, capped at the model's context (default 512)",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=number_arg(int, ge=0), default=0, metavar="N", help="CPU threads (default: all cores)"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from darkhorse.errors import DarkhorseError
    from darkhorse.interop.quantize import add_perplexity, layer_pattern, load_val_tokens, quantize_gguf

    if args.ppl_tokens < 2 or args.context < 2:
        raise DarkhorseError("--ppl-tokens and --context must be at least 2")
    console = Console()
    # Check --data before quantizing, so a bad data dir fails fast and writes nothing.
    tokens = load_val_tokens(args.data, args.input, args.ppl_tokens) if args.data else None
    report = quantize_gguf(args.input, args.out, args.qtype, force=args.force, threads=args.threads)
    if tokens is not None:
        with console.status("measuring perplexity with llama.cpp..."):
            add_perplexity(report, tokens, context=args.context, threads=args.threads)

    groups: dict[str, list] = defaultdict(list)
    for tensor in report.tensors:
        groups[layer_pattern(tensor.name)].append(tensor)
    table = Table(title=f"{report.out_path} ({report.qtype})")
    for column in ("tensor", "row length", "type in", "type out", "note"):
        table.add_column(column)
    for pattern, tensors in groups.items():
        counts = Counter(t.type_out for t in tensors)
        types_out = ", ".join(f"{t} x{n}" if len(tensors) > 1 else t for t, n in counts.items())
        fell_back = sum(t.fell_back for t in tensors)
        note = f"[yellow]fallback x{fell_back}[/]" if fell_back else ""
        table.add_row(pattern, str(tensors[0].shape[-1]), tensors[0].type_in, types_out, note)
    console.print(table)
    ratio = report.out_bytes / report.in_bytes
    console.print(f"size: {_mib(report.in_bytes)} -> {_mib(report.out_bytes)} ({ratio:.1%} of the input)")
    fallbacks = report.fallbacks
    if fallbacks:
        console.print(
            f"[yellow]{len(fallbacks)} of {len(report.tensors)} tensors fell back[/] from {report.qtype} (their rows "
            f"are not a multiple of the block size): " + ", ".join(f"{t.name} -> {t.type_out}" for t in fallbacks)
        )
    else:
        console.print(f"no fallbacks: every quantizable tensor took {report.qtype}'s types")
    if report.ppl_in is not None:
        change = report.ppl_out / report.ppl_in - 1
        console.print(
            f"perplexity on {report.ppl_tokens:,} val tokens (llama.cpp): {report.ppl_in:.4f} -> "
            f"{report.ppl_out:.4f} ({change:+.2%})"
        )
    return 0
