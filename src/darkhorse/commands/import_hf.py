"""Import a Hugging Face model directory as a darkhorse checkpoint.

Reads config.json, the safetensors weights (one file or shards with an index; transformers 5's fused
expert layout or per-expert keys) and the tokenizer of a LlamaForCausalLM, MistralForCausalLM,
MixtralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM or DeepseekV3ForCausalLM directory, and
writes a checkpoint that every command reading a checkpoint uses like a native one (e.g. generate, chat,
export, and train --init-from to fine-tune it). Also reads back a `darkhorse export --format
safetensors|pt` directory.

A foreign tokenizer is kept as it is: meta.json records its bos/eos tokens, its own chat template and
which darkhorse chat tokens it lacks. Nothing is half-written at --out; an existing --out needs --force.

example:
  darkhorse import ./Mixtral-tiny --out runs/mixtral-tiny/final"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "import a Hugging Face model directory (Llama, Mistral, Mixtral, Qwen2/3, DeepSeek-V3) as a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="directory with config.json + safetensors")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint dir to write (e.g. runs/NAME/final)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from darkhorse.interop.hf_import import import_hf

    out = import_hf(args.hf_dir, args.out, force=args.force)
    print(f"wrote checkpoint {out}")
    return 0
