"""LoRA-fine-tune a frozen base (a darkhorse checkpoint or a Hugging Face directory) on chat data.

  darkhorse finetune --base path/to/hf-mixtral --data chats.jsonl:0.8 --data memory.jsonl:0.2 \\
      --out runs/lora --expert-lora-r 32 --router-lora-r 16 --router-freeze-steps 500 \\
      --router-aux-loss-coef 0.01
  darkhorse finetune --out runs/lora --resume            continue exactly where it stopped

BASE is a darkhorse checkpoint or a Hugging Face directory (Llama, Mistral, Mixtral, Qwen2/3,
DeepseekV3), imported on the fly. Its weights stay frozen (--base-dtype bf16 holds them in bf16, with
train.dtype=bf16); only the adapters train and enter the optimizer. Raw --data files are rendered in the
base's own chat format (an imported model's chat template) and the loss counts the assistant's tokens
only; several --data are mixed by weight; --skip-bad skips malformed records. Train settings are
train.* KEY=VALUE overrides (train.lr=1e-4 train.batch_size=2 train.grad_accum=8 train.max_steps=1000
train.keep_last=3 ...); --minutes N is a wall-clock budget, as in `darkhorse train --help`.

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
and after. A resumed run keeps its base (--base may say where it is now: same weights), LoRA and router
settings: repeating them is fine, a changed one is refused. As with train, Ctrl-C or SIGTERM save and
exit with status 130 or 143, and one run at a time uses a RUN_DIR. `darkhorse merge --adapter RUN_DIR/final`
folds the adapter into a standalone model.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from darkhorse.commands.common import add_run_arguments, run_exit_status, take_run_overrides

HELP = "LoRA fine-tuning of a frozen base (MoE router/expert LoRA, router schedule), PEFT-format adapters"
# LoRASpec / RouterOptions field of each flag; a flag left out (None) keeps the default, or on --resume the run's
LORA_FLAGS = {"lora_r": "r", "expert_lora_r": "expert_r", "router_lora_r": "router_r", "lora_alpha": "alpha",
              "lora_dropout": "dropout"}  # fmt: skip
ROUTER_FLAGS = {"router_freeze_steps": "freeze_steps", "router_aux_loss_coef": "aux_loss_coef",
                "router_z_loss_coef": "z_loss_coef", "router_entropy_coef": "entropy_coef",
                "bias_update": "bias_update"}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, metavar="BASE", help="darkhorse checkpoint or Hugging Face model dir")
    add_run_arguments(parser, "chat file or prepared dir, repeatable; WEIGHT sets its share (default 1)")
    parser.add_argument("--lora-targets", metavar="GROUPS", help="comma-separated groups (default: per architecture)")
    parser.add_argument("--lora-r", type=int, help="rank for attention and dense MLPs (default 16)")
    parser.add_argument("--expert-lora-r", type=int, help="rank for routed and shared experts (default --lora-r)")
    parser.add_argument("--router-lora-r", type=int, help="rank for the routers (default --lora-r)")
    parser.add_argument("--lora-alpha", type=float, help="scaling numerator: alpha / r (default 16)")
    parser.add_argument("--lora-dropout", type=float, help="dropout on the LoRA input, [0, 1) (default 0)")
    parser.add_argument("--router-freeze-steps", type=int, help="steps before the router LoRA trains (default 0)")
    parser.add_argument("--router-aux-loss-coef", type=float, help="Switch/Mixtral load-balance loss (default 0)")
    parser.add_argument("--router-z-loss-coef", type=float, help="router z-loss coefficient (default 0)")
    parser.add_argument("--router-entropy-coef", type=float, help="load-entropy loss coefficient (default 0)")
    parser.add_argument(
        "--no-bias-update",
        dest="bias_update",
        action="store_const",
        const=False,
        help="freeze the auxiliary-loss-free bias of DeepSeek-style bases",
    )
    parser.add_argument("--base-dtype", choices=["fp32", "bf16"], help="dtype of the frozen base (default fp32)")
    parser.add_argument("--skip-bad", action="store_true", help="count, report and skip malformed data records")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="train.* overrides, e.g. train.lr=2e-4")


def run(args: argparse.Namespace) -> int:
    from darkhorse.finetune.lora import LoRASpec
    from darkhorse.finetune.run import RouterOptions, finetune, resume_settings

    take_run_overrides(args)
    lora = {field: getattr(args, flag) for flag, field in LORA_FLAGS.items() if getattr(args, flag) is not None}
    if args.lora_targets is not None:
        lora["targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    router = {field: getattr(args, flag) for flag, field in ROUTER_FLAGS.items() if getattr(args, flag) is not None}
    if args.resume:  # the run's own settings, with the flags given over them (finetune refuses a change)
        spec, options, _ = resume_settings(args.out, args.resume)
    else:  # --expert-lora-r and --router-lora-r default to --lora-r
        r = lora.get("r", LoRASpec.r)
        spec, options = LoRASpec(r=r, expert_r=r, router_r=r), RouterOptions()
    result = finetune(
        args.base,
        args.data,
        args.out,
        spec=dataclasses.replace(spec, **lora),
        router=dataclasses.replace(options, **router),
        overrides=args.overrides,
        resume=args.resume,
        force=args.force,
        base_dtype=args.base_dtype,
        skip_bad=args.skip_bad,
        logger=args.logger,
        verbose=not args.quiet,
    )
    return run_exit_status(result)
