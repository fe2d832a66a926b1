"""Chat with a checkpoint in darkhorse's chat format (system/user/assistant turns, optional thinking).

Interactive in a terminal; with piped input each line is one user turn. Commands: /reset,
/think on|off, /system TEXT, /quit.

An imported model whose tokenizer lacks darkhorse's chat tokens is prompted with its own chat template
(the chat_template of the tokenizer_config.json it was imported with), rendered with Jinja2 as
transformers renders it; /think on|off passes enable_thinking to that template (Qwen3 reads it). Its
replies end at eos or an end-of-turn token (<|eot_id|>, <|im_end|>, ...). Without darkhorse's tokens
or a template, chat stops with an error (use `darkhorse generate` for plain text)."""

from __future__ import annotations

import argparse
from pathlib import Path

from darkhorse.commands.generate import add_sampling_arguments, sampling_options

HELP = "interactive multi-turn chat with a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint dir (e.g. runs/NAME/final)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--no-think", action="store_true", help="start with reasoning off (<|no_think|>)")
    add_sampling_arguments(parser)
    parser.set_defaults(max_new_tokens=256)


def run(args: argparse.Namespace) -> int:
    from darkhorse.checkpoint import load_for_inference
    from darkhorse.infer.chat import ChatSession, run_repl

    options = sampling_options(args)
    model, tokenizer, _ = load_for_inference(args.checkpoint, args.device)
    session = ChatSession(model, tokenizer, options, think=not args.no_think, system=args.system)
    run_repl(session)
    return 0
