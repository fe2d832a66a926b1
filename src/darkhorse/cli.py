"""`darkhorse` console script: a thin dispatcher over the subcommand modules in `darkhorse.commands`.

Each subcommand module defines HELP, `add_arguments(parser)` and `run(args) -> int`; heavy imports
happen inside `run`, so `darkhorse --help` stays fast. User mistakes surface as one line on stderr
and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from darkhorse.errors import DarkhorseError

# Command name -> module in darkhorse.commands. Order is the order `darkhorse --help` shows.
SUBCOMMANDS = {
    "demo": "demo",
    "download": "download",
    "prepare": "prepare",
    "train": "train",
    "generate": "generate",
    "chat": "chat",
    "eval": "eval",
    "serve": "serve",
    "params": "params",
    "export": "export",
    "import": "import_hf",
    "quantize": "quantize",
    "finetune": "finetune",
    "merge": "merge",
}

EPILOG = """workflow:
  darkhorse demo                                   train and evaluate on the built-in corpus
  darkhorse train --preset tiny-cpu --data DIR --out runs/tiny
  darkhorse train --out runs/tiny --resume         continue where it stopped
  darkhorse generate --checkpoint runs/tiny/final --prompt "Hello"
  darkhorse serve --checkpoint runs/tiny/final     an OpenAI-compatible server on 127.0.0.1:8000
  darkhorse --prompt "Hello"                       generate with the most recent run
  darkhorse --params 1b --prompt "Hello"           ... the most recent run of preset genesis-1b

Run `darkhorse COMMAND --help` for the options of each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="darkhorse",
        description="darkhorse: from raw text to a language model you can train, chat with and export.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"darkhorse {_version()}")
    parser.add_argument("--prompt", help="with no command: generate from the most recent run's final checkpoint")
    parser.add_argument(
        "--params",
        "--preset",
        dest="latest_preset",
        metavar="SIZE",
        help="with --prompt: the most recent run trained from this preset (1b, 5b, 30b, 500b or a preset name)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f"darkhorse.commands.{module_name}")
        command = sub.add_parser(
            name,
            help=module.HELP,
            description=(module.__doc__ or module.HELP).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def _version() -> str:
    from darkhorse import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            if args.prompt is None:
                if args.latest_preset is not None:
                    raise DarkhorseError(
                        f"--params {args.latest_preset} needs --prompt TEXT here; to train or count that model, "
                        f"put it after the command: `darkhorse train --params {args.latest_preset} ...`"
                    )
                parser.print_help()
                return 0
            from darkhorse.commands.generate import run_latest

            return run_latest(args.prompt, args.latest_preset)
        if args.latest_preset is not None:
            raise DarkhorseError(
                f"--params/--preset before `{args.command}` only pick a run for `darkhorse --prompt`; "
                "put it after the command"
            )
        return int(args.handler(args) or 0)
    except DarkhorseError as exc:
        print(f"darkhorse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("darkhorse: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
