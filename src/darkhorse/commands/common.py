"""Arguments shared by the commands that take a run config."""

from __future__ import annotations

import argparse

from darkhorse.config import RunConfig, list_presets, load_run_config


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
