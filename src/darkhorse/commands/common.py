"""Arguments shared by the commands that take a run config, and by the two that run the trainer (train, finetune)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

from darkhorse.config import RunConfig, list_presets, load_run_config, number_arg


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    parser.add_argument(
        "--preset",
        default=default_preset,
        help=f"named preset ({', '.join(list_presets())}; aliases 1b/5b/30b/500b)",
    )
    parser.add_argument(
        "--params", dest="preset_alias", metavar="SIZE", help="alias: --params 5b = --preset genesis-5b"
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with model:/train: sections, over the preset")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. train.lr=3e-4 model.n_layers=4",
    )


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> RunConfig:
    preset = args.preset_alias or args.preset
    return load_run_config(preset=preset, config_file=args.config, overrides=args.overrides, base=base)


def add_run_arguments(parser: argparse.ArgumentParser, data_help: str) -> None:
    """--data, --out, --max-steps, --minutes, --resume, --force, --logger and --quiet (train and finetune take them)."""
    parser.add_argument("--data", action="append", default=[], metavar="PATH[:WEIGHT]", help=data_help)
    parser.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="run directory")
    parser.add_argument("--max-steps", type=number_arg(int, gt=0), help="optimizer steps in total (train.max_steps)")
    parser.add_argument(
        "--minutes",
        type=number_arg(float, gt=0),
        metavar="N",
        help="wall-clock budget in total (train.minutes): the lr decay follows the time spent and the run stops "
        "when it is spent; --max-steps, if given, still caps the steps",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        type=Path,
        metavar="CKPT_DIR",
        help="continue from the newest checkpoint in RUN_DIR, or from CKPT_DIR",
    )
    parser.add_argument(
        "--force", action="store_true", help="start over in a RUN_DIR that holds a run (deletes its checkpoints)"
    )
    parser.add_argument("--logger", choices=["tensorboard", "wandb"], help="also log to TensorBoard or W&B")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors (metrics.jsonl still written)")


def take_run_overrides(args: argparse.Namespace, shortcuts: tuple[str, ...] = ("max_steps",)) -> None:
    """Put `--resume train.max_steps=500` back (argparse gave the override to --resume's optional CKPT_DIR)
    and turn the given train.<flag> shortcuts (--max-steps ...) into overrides. --minutes N is
    train.minutes=N with no step cap unless --max-steps or a train.max_steps=K override sets one."""
    if isinstance(args.resume, Path) and "=" in str(args.resume) and not args.resume.exists():
        args.overrides.insert(0, str(args.resume))
        args.resume = True
    if args.minutes is not None:  # the flags win over KEY=VALUE overrides, which win over this step cap
        args.overrides.insert(0, "train.max_steps=0")
    for flag in ("minutes", *shortcuts):
        value = getattr(args, flag)
        if value is not None:
            args.overrides.append(f"train.{flag}={value}")


def run_exit_status(result: Any) -> int:
    """0 for a finished run; 128 + the signal's number (130 SIGINT, 143 SIGTERM) for one a signal
    stopped (after it saved), as shells report it, so scripts can tell the two apart."""
    return 128 + signal.Signals[result.stopped_by].value if result.interrupted else 0
