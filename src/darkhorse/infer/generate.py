"""Text in, text out on top of the decode engine: completions streamed piece by piece as they come."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from itertools import takewhile
from typing import Protocol, TextIO

from darkhorse.infer.engine import Engine
from darkhorse.infer.prompting import chat_stop_ids
from darkhorse.model import Transformer


class TextCodec(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...

    @property
    def vocab_size(self) -> int: ...


def stream_text(tokenizer: TextCodec, ids: Iterable[int]) -> Iterator[str]:
    """Turn a stream of ids into text pieces, holding back bytes of a half-finished character."""
    generated: list[int] = []
    emitted = ""
    for token_id in ids:
        generated.append(token_id)
        text = tokenizer.decode(generated)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted) :]
        emitted = text


def generate_text(model: Transformer, tokenizer: TextCodec, prompt: str, **options) -> str:
    """Complete `prompt` and return only the new text (options as for `Engine.decode`)."""
    options.setdefault("max_new_tokens", 64)
    ids = Engine(model, tokenizer.vocab_size).stream(tokenizer.encode(prompt), **options)
    return "".join(stream_text(tokenizer, ids))


def stream_completion(
    model: Transformer, tokenizer, prompt_text: str, options: dict, out: TextIO | None = None, chat: bool = False
) -> str:
    """Print the completion as it is generated and return it (without the token that ended it).

    Plain text stops at the tokenizer's eos; a chat reply also stops at the end of the assistant turn."""
    out = out or sys.stdout  # looked up per call: tests and callers may swap sys.stdout
    stop_ids = chat_stop_ids(tokenizer) if chat else {tokenizer.eos_id}
    ids = Engine(model, tokenizer.vocab_size).stream(tokenizer.encode(prompt_text), stop_ids=stop_ids, **options)
    pieces = []
    for piece in stream_text(tokenizer, takewhile(lambda i: i not in stop_ids, ids)):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    return "".join(pieces)
