"""Chat with a checkpoint in darkhorse's chat format (system/user/assistant turns, optional thinking).

Interactive in a terminal; with piped input each line is one user turn. Commands: /reset,
/think on|off, /system TEXT, /quit."""

from __future__ import annotations

import argparse
from pathlib import Path

from darkhorse.commands.generate import add_sampling_arguments, load_for_inference, sampling_options

HELP = "interactive multi-turn chat with a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="checkpoint dir (e.g. runs/NAME/final)"
    )
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--no-think", action="store_true", help="start with reasoning off (<|no_think|>)")
    add_sampling_arguments(parser)
    parser.set_defaults(max_new_tokens=256)


def run(args: argparse.Namespace) -> int:
    from darkhorse.infer.chat import ChatSession, run_repl

    options = sampling_options(args)
    model, _, tokenizer = load_for_inference(args.checkpoint, args.device)
    session = ChatSession(model, tokenizer, options, think=not args.no_think, system=args.system)
    run_repl(session)
    return 0
