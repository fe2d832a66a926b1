"""Chat with a checkpoint in its chat format: darkhorse's (system/user/assistant turns with a think block), or
for an imported model whose tokenizer lacks darkhorse's chat tokens, the chat template of the
tokenizer_config.json it was imported with (rendered with Jinja2 as transformers renders it; /reasoning
on|off passes enable_thinking to it, which Qwen3 reads). Replies end at eos or an end-of-turn token
(<|/assistant|>, <|eot_id|>, <|im_end|>, ...). Without darkhorse's tokens or a template, chat stops with an
error (use `darkhorse generate` for plain text).

Replies stream as they are decoded, followed by a line with the tokens, tokens/s and the context used. The
model's reasoning is hidden unless --show-thinking or /think (then shown dim before the answer); special
tokens are never printed. When the conversation outgrows the model's context the oldest turns are dropped
with a notice; the system prompt stays.

In a terminal: type a message and Enter. Piped input: each line is one message or command. A line that is
not UTF-8 text is skipped with a notice; an error on one turn never ends the chat.

commands (type /help in the chat for details):
  /think [on|off]   show or hide reasoning      /reasoning on|off   reason first, or answer directly
  /system TEXT      set the system prompt       /clear (/reset)     forget the conversation
  /save [FILE]      save it as JSON messages    /load FILE          continue a saved conversation
  /help             list the commands           /quit (/exit)       leave
multi-line input: end a line with \\ to continue it, or put the text between two lines of \"\"\".

examples:
  darkhorse chat --checkpoint runs/mine/final --show-thinking
  darkhorse chat --checkpoint runs/imported/final --system "Answer briefly." --temperature 0.7 --seed 1"""

from __future__ import annotations

import argparse
from pathlib import Path

from darkhorse.commands.generate import add_sampling_arguments, sampling_options

HELP = "interactive multi-turn chat with a checkpoint (/help lists the commands)"
MAX_NEW_TOKENS = 256  # a reply with reasoning needs more room than a plain completion


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint dir (e.g. runs/NAME/final)")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--show-thinking", action="store_true", help="show the model's reasoning (toggle with /think)")
    parser.add_argument(
        "--no-think", action="store_true", help="ask for answers without reasoning (<|no_think|>; /reasoning on|off)"
    )
    add_sampling_arguments(parser, max_new_tokens=MAX_NEW_TOKENS)


def run(args: argparse.Namespace) -> int:
    import sys

    from darkhorse.checkpoint import load_for_inference
    from darkhorse.infer.chat import ChatSession, run_repl
    from darkhorse.infer.prompting import render_chat_prompt
    from darkhorse.train.device import resolve_device

    options = sampling_options(args)
    model, tokenizer, _ = load_for_inference(args.checkpoint, resolve_device(args.device))
    render_chat_prompt(tokenizer, [{"role": "user", "content": "hi"}])  # no chat format: one error now, not per turn
    session = ChatSession(
        model,
        tokenizer,
        options,
        think=not args.no_think,
        show_thinking=args.show_thinking,
        system=args.system,
        color=sys.stdout.isatty(),
    )
    run_repl(session)
    return 0
