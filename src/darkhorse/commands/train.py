"""Train a model on prepared data (or raw .jsonl/.txt/.parquet files), with exact resume.

  darkhorse train --preset tiny-cpu --data data/prepared --out runs/tiny
  darkhorse train --preset d20 --data web/:3 --data code/:1 --out runs/mix train.lr=1e-3
  darkhorse train --out runs/tiny --resume                 continue from the newest checkpoint
  darkhorse train --out runs/tiny --resume --max-steps 400 continue, and train for longer
  darkhorse train --preset d20 --data data/prepared --out runs/d20 --minutes 10
                                                           10 minutes of wall clock, the lr decay ending on time
  darkhorse train --preset tiny-cpu --data data/prepared --out runs/old train.recipe=classic
                                                           the preset's recipe from before its tuned one (AdamW, cosine)
  darkhorse train --init-from runs/llama/final --data data/mine --out runs/ft train.lr=1e-5
                                                           fine-tune a checkpoint (e.g. an imported one)

Each --data is PATH or PATH:WEIGHT. A directory is a prepared dir (`darkhorse prepare`); a raw file
is prepared on the fly into a cache. Several sources are mixed in the given proportions and must
share one tokenizer. The model's vocab_size comes from the data (with --init-from, from the checkpoint).

RUN_DIR gets step-NNNNNN/ checkpoints (the newest train.keep_last kept), final/, metrics.jsonl
(one JSON record per logged step and evaluation) and loss.png. Ctrl-C or SIGTERM finish the
current step, save a checkpoint and exit with status 130 or 143; --resume then continues with exactly
the same losses, from the newest intact checkpoint (a damaged one is reported and skipped). One run
at a time uses a RUN_DIR: a second is refused, naming the first one's pid.
A resumed run keeps its config; only max-steps, minutes, min_steps, the intervals, keep_last, device,
compile, kernels and max_bad_steps may change. With a terminal the progress shows as a live view,
otherwise as one line per --log-interval.

--minutes N (train.minutes) is a wall-clock budget: the lr schedule's decay (cosine over the whole
budget, wsd over its last train.wsd_decay_fraction) follows the share of the budget spent rather
than of the steps, so it lands on the budget's end however the machine's load moves,
and the run stops (saving final/) once the budget is spent. Warmup stays in steps. There is no step
cap unless --max-steps (or train.max_steps=K) gives one; train.min_steps=K is a floor: the run goes
on past the clock until K steps, the decay following whichever of time and steps is less far along.
The time spent is saved with every checkpoint, so --resume spends only what is left (setup and the
time between runs do not count), and `--resume --minutes 20` makes the budget 20 minutes in all.

Several processes (train.parallel=ddp, or fsdp: ZeRO-3 sharding with sharded checkpoints):
  darkhorse train --nproc 2 --preset d20 --data DIR --out runs/d20      torchrun on this machine
  torchrun --nproc-per-node 8 -m darkhorse train ... train.parallel=fsdp  (multi-node: see README)
train.batch_size is per rank: a step reads batch_size x grad_accum x ranks windows. Only rank 0 prints
and writes metrics.jsonl; each rank logs to RUN_DIR/logs/rank-N.log. --resume works at another number
of ranks when it divides the global batch (the per-rank batch is adjusted). Under torchrun give prepared
dirs (or let --nproc prepare raw files first): ranks preparing the same raw file at once would race.

--init-from CKPT_DIR starts a new run (step 0, new optimizer and schedule) from the model config and
weights of any checkpoint, including one written by `darkhorse import` (which has no trainer state).
Train settings start from the checkpoint's train section, with --preset/--config/overrides over it
(all optional; their model sections are not used, and model.* overrides are refused). The data must
be prepared with the checkpoint's tokenizer (`darkhorse prepare --tokenizer CKPT_DIR/tokenizer.json`).
--resume continues such a run like any other.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from darkhorse.commands.common import (
    add_config_arguments,
    add_run_arguments,
    config_from_args,
    run_exit_status,
    take_run_overrides,
)
from darkhorse.config import number_arg

HELP = "train a model from a preset or config on prepared data, resumable exactly"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    add_run_arguments(parser, "prepared dir or raw file, repeatable; WEIGHT sets its share of the windows (default 1)")
    parser.add_argument(
        "--init-from",
        type=Path,
        metavar="CKPT_DIR",
        help="start from this checkpoint's model and weights with fresh optimizer state (fine-tuning)",
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda", "mps"], help="where to train (train.device; auto: cuda > mps > cpu)"
    )
    parser.add_argument(
        "--log-interval", type=number_arg(int, gt=0), help="steps between log lines (train.log_interval)"
    )
    parser.add_argument(
        "--nproc",
        type=number_arg(int, gt=0),
        metavar="N",
        help="train on N processes of this machine: starts torchrun (train.parallel defaults to ddp)",
    )


def _launch_torchrun(nproc: int, command_line: list[str], parallel: str) -> int:
    """This same command under `torchrun --standalone` with N processes, without --nproc."""
    import subprocess
    import sys

    argv, skip = [], False
    for item in command_line:
        if skip or item.startswith("--nproc="):
            skip = False
            continue
        skip = item == "--nproc"
        if not skip:
            argv.append(item)
    if parallel == "none":
        argv.append("train.parallel=ddp")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([*launcher, "-m", "darkhorse", *argv]).returncode


def run(args: argparse.Namespace) -> int:
    from darkhorse.data.loader import parse_data_spec
    from darkhorse.errors import DarkhorseError
    from darkhorse.train.run_dir import base_config
    from darkhorse.train.trainer import train

    take_run_overrides(args, ("max_steps", "device", "log_interval"))
    if args.init_from:
        model_overrides = [item for item in args.overrides if item.strip().startswith("model.")]
        if model_overrides:
            raise DarkhorseError(
                f"{', '.join(model_overrides)}: with --init-from the model comes from {args.init_from}; "
                "only train.* settings apply"
            )
    base = base_config(args.out, args.resume, args.init_from, args.force)
    if base is None and not (args.preset or args.preset_alias or args.config):
        raise DarkhorseError(
            "train needs --preset NAME or --config FILE.yaml (or --resume to continue a run, "
            "or --init-from CKPT_DIR to start from a checkpoint)"
        )
    if not args.data and not args.resume:
        raise DarkhorseError("train needs --data PATH (a prepared dir or a .jsonl/.txt/.parquet file)")
    config = config_from_args(args, base=base)
    if args.nproc is not None:
        from darkhorse.train.distributed import launched_by_torchrun

        if launched_by_torchrun():
            raise DarkhorseError("--nproc starts torchrun itself; under torchrun leave it out")
        if args.data:  # raw files are prepared here, once, into the cache the ranks then read
            from darkhorse.data.loader import open_sources

            open_sources([parse_data_spec(spec) for spec in args.data], vocab_size=config.model.vocab_size)
        return _launch_torchrun(args.nproc, args.command_line, config.train.parallel)
    data = [parse_data_spec(spec) for spec in args.data]
    result = train(
        config,
        data,
        args.out,
        resume=args.resume,
        init_from=args.init_from,
        force=args.force,
        logger=args.logger,
        verbose=not args.quiet,
    )
    return run_exit_status(result)
