"""LoRA-fine-tune a frozen base (a darkhorse checkpoint or a Hugging Face directory) on chat data.

  darkhorse finetune --base path/to/hf-mixtral --data chats.jsonl:0.8 --data memory.jsonl:0.2 \\
      --out runs/lora --expert-lora-r 32 --router-lora-r 16 --router-freeze-steps 500 \\
      --router-aux-loss-coef 0.01
  darkhorse finetune --out runs/lora --resume            continue exactly where it stopped

BASE is a darkhorse checkpoint or a Hugging Face directory (Llama, Mistral, Mixtral, Qwen2/3,
DeepseekV3), imported on the fly. Its weights stay frozen (--base-dtype bf16 holds them in bf16, with
train.dtype=bf16); only the adapters train and enter the optimizer. Raw --data files are rendered in the
base's own chat format (an imported model's chat template) and the loss counts the assistant's tokens
only; several --data are mixed by weight. Train settings are train.* KEY=VALUE overrides
(train.lr=1e-4 train.batch_size=2 train.grad_accum=8 train.max_steps=1000 train.keep_last=3 ...).

LoRA targets (--lora-targets, comma-separated): attention, shared_experts, routed_experts, router,
dense_mlp. Default: attention,router,routed_experts for MoE bases, attention,dense_mlp for dense ones.
--lora-r applies to attention and dense MLPs, --expert-lora-r to routed and shared experts,
--router-lora-r to routers; the scaling is --lora-alpha / r. A target the base lacks, or one PEFT cannot
hold for the base's architecture, is refused before anything is written.

The router LoRA stays frozen for --router-freeze-steps and then trains (its optimizer state starts then).
--router-aux-loss-coef adds the Switch/Mixtral load-balance loss, --router-z-loss-coef the router z-loss,
--router-entropy-coef log(E) - H(mean routing probabilities). On DeepSeek-style bases the
auxiliary-loss-free selection bias keeps updating (--no-bias-update stops it).

RUN_DIR gets step-NNNNNN/ and final/, each an adapter directory that PEFT loads
(adapter_config.json, adapter_model.safetensors keyed by the base's Hugging Face names) plus
darkhorse_adapter.json (the base's path and weight fingerprint), meta.json, the tokenizer and
trainer_state.pt (the adapters' optimizer state: checkpoints stay small); the newest train.keep_last
step checkpoints are kept. metrics.jsonl also records the trainable parameters per group and how
routing drifted from the base (KL, load entropy, dead experts); routing_drift.png shows the load before
and after. A resumed run keeps its base, LoRA and router settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "LoRA fine-tuning of a frozen base (MoE router/expert LoRA, router schedule), PEFT-format adapters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, metavar="BASE", help="darkhorse checkpoint or Hugging Face model dir")
    parser.add_argument(
        "--data", action="append", default=[], metavar="PATH[:WEIGHT]", help="chat file or prepared dir, repeatable"
    )
    parser.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="run directory")
    parser.add_argument("--lora-targets", metavar="GROUPS", help="comma-separated groups (default: per architecture)")
    parser.add_argument("--lora-r", type=int, default=16, help="rank for attention and dense MLPs (default 16)")
    parser.add_argument("--expert-lora-r", type=int, help="rank for routed and shared experts (default --lora-r)")
    parser.add_argument("--router-lora-r", type=int, help="rank for the routers (default --lora-r)")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="scaling numerator: alpha / r (default 16)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input, [0, 1)")
    parser.add_argument("--router-freeze-steps", type=int, default=0, help="steps before the router LoRA trains")
    parser.add_argument("--router-aux-loss-coef", type=float, default=0.0, help="Switch/Mixtral load-balance loss")
    parser.add_argument("--router-z-loss-coef", type=float, default=0.0, help="router z-loss coefficient")
    parser.add_argument("--router-entropy-coef", type=float, default=0.0, help="load-entropy loss coefficient")
    parser.add_argument(
        "--no-bias-update", action="store_true", help="freeze the auxiliary-loss-free bias of DeepSeek-style bases"
    )
    parser.add_argument("--base-dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the frozen base")
    parser.add_argument("--max-steps", type=int, help="optimizer steps in total (train.max_steps)")
    parser.add_argument("--resume", nargs="?", const=True, type=Path, metavar="CKPT_DIR", help="continue a run")
    parser.add_argument("--force", action="store_true", help="start over in a RUN_DIR that holds a run")
    parser.add_argument("--logger", choices=["tensorboard", "wandb"], help="also log to TensorBoard or W&B")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="train.* overrides, e.g. train.lr=2e-4")


def run(args: argparse.Namespace) -> int:
    from darkhorse.finetune.lora import LoRASpec
    from darkhorse.finetune.run import RouterOptions, finetune

    if isinstance(args.resume, Path) and "=" in str(args.resume) and not args.resume.exists():
        args.overrides.insert(0, str(args.resume))  # `--resume train.max_steps=9`: the override, not a dir
        args.resume = True
    if args.max_steps is not None:
        args.overrides.append(f"train.max_steps={args.max_steps}")
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else ()
    spec = LoRASpec(
        targets=targets,
        r=args.lora_r,
        expert_r=args.expert_lora_r if args.expert_lora_r is not None else args.lora_r,
        router_r=args.router_lora_r if args.router_lora_r is not None else args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
    )
    router = RouterOptions(
        freeze_steps=args.router_freeze_steps,
        aux_loss_coef=args.router_aux_loss_coef,
        z_loss_coef=args.router_z_loss_coef,
        entropy_coef=args.router_entropy_coef,
        bias_update=not args.no_bias_update,
    )
    finetune(
        args.base,
        args.data,
        args.out,
        spec=spec,
        router=router,
        overrides=args.overrides,
        resume=args.resume,
        force=args.force,
        base_dtype=args.base_dtype,
        logger=args.logger,
        verbose=not args.quiet,
    )
    return 0
