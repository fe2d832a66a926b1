"""`darkhorse` console script: a thin dispatcher over the subcommand modules in `darkhorse.commands`.

Each subcommand module defines HELP, `add_arguments(parser)` and `run(args) -> int`; heavy imports
happen inside `run`, so `darkhorse --help` stays fast.

`main` is the one error boundary: whatever goes wrong (a user mistake, a full disk, a corrupt file, an
error inside torch) ends as one line, `darkhorse: error: <what> (<path>)`, and an exit code that says
which kind it was (`EXIT_CODES`, documented in docs/reliability.md); `--debug` or DARKHORSE_DEBUG=1
lets the traceback through instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import sys
import time
import traceback

from darkhorse.errors import CorruptFileError, DarkhorseError, RankFailure, path_of

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
    "consolidate": "consolidate",
}

EPILOG = """workflow:
  darkhorse demo                                   train and evaluate on the built-in corpus
  darkhorse train --preset tiny-cpu --data DIR --out runs/tiny
  darkhorse train --out runs/tiny --resume         continue where it stopped
  darkhorse generate --checkpoint runs/tiny/final --prompt "Hello"
  darkhorse serve --checkpoint runs/tiny/final     an OpenAI-compatible server on 127.0.0.1:8000
  darkhorse --prompt "Hello"                       generate with the most recent run
  darkhorse --params 1b --prompt "Hello"           ... the most recent run of preset genesis-1b

Run `darkhorse COMMAND --help` for the options of each command.
--debug (or DARKHORSE_DEBUG=1) shows the traceback of an error instead of its one line."""

# Exit status by kind of failure; argparse's own usage errors exit 2 as well.
EXIT_CODES = {
    "input": 2,  # DarkhorseError: bad input, config or arguments the user can fix
    "file": 3,  # a file that cannot be parsed: corrupt safetensors, invalid JSON, not UTF-8, nested too deep
    "os": 4,  # the system refused: disk full, read-only, permission denied, no such file, is a directory
    "library": 5,  # torch or another library rejected the work (RuntimeError, ValueError, TypeError, out of memory)
    "internal": 1,  # anything else is a darkhorse bug: rerun with --debug and report it
    "interrupted": 130,  # Ctrl-C
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="darkhorse",
        description="darkhorse: from raw text to a language model you can train, chat with and export.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"darkhorse {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (DARKHORSE_DEBUG=1)")
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
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.set_defaults(handler=module.run)
    return parser


def _version() -> str:
    from darkhorse import __version__

    return __version__


def _first_line(exc: BaseException) -> str:
    """The gist of a library's message: its first non-empty line, without torch's advice to unpickle
    untrusted files (`weights_only=False`), which darkhorse never takes."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and "weights_only" not in line]
    return lines[0] if lines else type(exc).__name__


def describe_error(exc: Exception) -> tuple[str, int]:
    """(one-line message, exit code) for any exception that reaches the CLI."""
    if isinstance(exc, CorruptFileError):
        return str(exc), EXIT_CODES["file"]
    if isinstance(exc, DarkhorseError):
        return str(exc), EXIT_CODES["input"]
    if isinstance(exc, FileExistsError) and os.path.isfile(path_of(exc) or ""):
        what, kind = "a file stands where a directory is needed", "os"
    elif isinstance(exc, OSError):
        what, kind = exc.strerror or _first_line(exc), "os"
    elif type(exc).__name__ == "SafetensorError":  # safetensors' Rust error, whatever module exports it
        what, kind = f"not a valid safetensors file ({_first_line(exc)})", "file"
    elif isinstance(exc, json.JSONDecodeError):
        what, kind = f"invalid JSON at line {exc.lineno} ({exc.msg})", "file"
    elif isinstance(exc, UnicodeError):
        what, kind = f"not UTF-8 text ({_first_line(exc)})", "file"
    elif isinstance(exc, RecursionError):
        what, kind = "input nested too deeply to read", "file"
    elif isinstance(exc, pickle.UnpicklingError):
        what, kind = "refused to load it: not a plain tensor file (nothing in it was executed)", "file"
    elif isinstance(exc, MemoryError):
        what, kind = "out of memory", "library"
    elif isinstance(exc, (RuntimeError, ValueError, TypeError, ArithmeticError, AssertionError, LookupError)):
        what, kind = _first_line(exc), "library"
    else:
        what = f"internal error {type(exc).__name__}: {_first_line(exc)} (rerun with --debug and report it)"
        kind = "internal"
    path = path_of(exc)
    return (f"{what} ({path})" if path and path not in what else what), EXIT_CODES[kind]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("DARKHORSE_DEBUG", "") not in ("", "0")
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # what `train --nproc` hands to torchrun
    try:
        return _dispatch(parser, args)
    except KeyboardInterrupt:
        print("darkhorse: interrupted", file=sys.stderr)
        return _leave(EXIT_CODES["interrupted"])
    except Exception as exc:
        if debug and not _process_group_standing():
            raise
        return report_failure(exc, debug)


# How long a rank other than 0 waits, after a refusal, for torchrun to stop it (rank 0 exits once it has said it)
REFUSAL_GRACE_S = 30.0


def report_failure(exc: Exception, debug: bool = False) -> int:
    """Say what failed in one line on stderr, once per run, and return its exit code (exit at once with it
    while a process group is up). Under torchrun a refusal every rank meets alike is said by rank 0 alone;
    another rank waits for torchrun to stop it, since leaving first would have torchrun stop rank 0 before it
    has said it. A rank still running after the grace period met the refusal alone and says it itself."""
    if debug:
        traceback.print_exception(exc)
        return _leave(EXIT_CODES["internal"])
    message, code = describe_error(exc)
    lines = [line.strip() for line in message.splitlines() if line.strip() and "weights_only" not in line]
    message = " ".join(lines) or type(exc).__name__  # one line, always, never torch's advice to unpickle
    rank = os.environ.get("RANK", "0")
    if isinstance(exc, RankFailure) or rank == "0":
        print(f"darkhorse: error: {message}", file=sys.stderr)
    else:
        if isinstance(exc, DarkhorseError):
            sys.stderr.flush()
            time.sleep(REFUSAL_GRACE_S)
        print(f"darkhorse: error: rank {rank}: {message}", file=sys.stderr)
    return _leave(code)


def _process_group_standing() -> bool:
    """Whether a torchrun process group is still up: a run that failed leaves it (see `Trainer.run`)."""
    distributed = sys.modules.get("torch.distributed")
    return distributed is not None and distributed.is_available() and distributed.is_initialized()


def _leave(code: int) -> int:
    """`code`, or exit with it at once when a process group is up: Python's normal exit would wait for
    this rank's collectives still in flight, which peers stuck elsewhere never join (a hang until
    train.dist_timeout); torchrun then stops the other ranks."""
    if _process_group_standing():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
