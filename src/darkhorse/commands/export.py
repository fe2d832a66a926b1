"""Export a checkpoint for other engines.

  --format hf           a Hugging Face directory (config.json, sharded safetensors, tokenizer with a chat
                        template) that transformers and vLLM load: dense models as LlamaForCausalLM (or
                        Qwen2/Qwen3 when they have q/k/v biases or q/k norms), softmax-routed MoE with GQA
                        as MixtralForCausalLM, MLA (+ MoE, MTP) as DeepseekV3ForCausalLM
  --format gguf         one .gguf file for llama.cpp (--outtype f32|f16|bf16|q8_0)
  --format safetensors  our own tensor names + config.json + tokenizer.json (`darkhorse import` reads it back)
  --format pt           the same with model.pt (torch.save of tensors only; load with weights_only=True)

Models that the target cannot represent (e.g. mHC residual streams for hf/gguf) are refused with the
reason. Output goes to a temp path first and is renamed at the end; an existing --out needs --force.

examples:
  darkhorse export --checkpoint runs/tiny/final --format hf --out exports/tiny-hf
  darkhorse export --checkpoint runs/tiny/final --format gguf --outtype q8_0 --out exports/tiny.gguf
  darkhorse export --checkpoint runs/iso/final --format gguf --domains code --out exports/code.gguf
                        (a specialist of a model trained with model.moe.domain_routing=isolated)"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "export a checkpoint as a Hugging Face dir, GGUF, or plain safetensors/pt state dict"
FORMATS = ("hf", "gguf", "safetensors", "pt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint dir (e.g. runs/NAME/final)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write (see above)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (a .gguf file for gguf)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), help="hf/safetensors/pt weight dtype (default: as stored)"
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="hf: largest safetensors shard, e.g. 5GB, 500MB (default 5GB)"
    )
    parser.add_argument(
        "--outtype", default="f16", choices=("f32", "f16", "bf16", "q8_0"), help="gguf: tensor type (default f16)"
    )
    parser.add_argument(
        "--domains",
        metavar="NAME[,NAME]",
        help="a model trained with model.moe.domain_routing=isolated: export a specialist that keeps only the "
        "shared experts and these domains' expert groups, the router restricted to them",
    )


def run(args: argparse.Namespace) -> int:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="darkhorse-specialist-") as temp:
        checkpoint = args.checkpoint
        if args.domains:
            from darkhorse.errors import DarkhorseError
            from darkhorse.interop.specialist import cut_specialist

            if not (args.checkpoint / "tokenizer.json").exists():  # said before any work, about the user's path
                raise DarkhorseError(
                    f"{args.checkpoint} has no tokenizer.json; copy the one from the prepared data dir"
                )

            checkpoint = cut_specialist(args.checkpoint, args.domains.split(","), Path(temp) / "specialist")
            print(f"specialist for {args.domains}: {_params(checkpoint):,} of {_params(args.checkpoint):,} parameters")
        out = _export(args, checkpoint)
    print(f"wrote {args.format} export to {out}")
    return 0


def _params(checkpoint: Path) -> int:
    from darkhorse.checkpoint import load_model

    return sum(p.numel() for p in load_model(checkpoint)[0].parameters())


def _export(args: argparse.Namespace, checkpoint: Path) -> Path:
    from darkhorse.interop.export import export_checkpoint

    return export_checkpoint(
        checkpoint,
        args.out,
        args.format,
        force=args.force,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        outtype=args.outtype,
    )
