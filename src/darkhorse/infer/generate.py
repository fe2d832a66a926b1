"""Text in, text out on top of the decode engine: completions streamed piece by piece as they come, and chat
replies split into reasoning and answer as they stream, with no special token ever shown."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from itertools import takewhile
from typing import Protocol, TextIO

from darkhorse.infer.engine import Engine
from darkhorse.infer.prompting import chat_stop_ids, encode_chat_prompt, prompt_opens_think, think_marker_ids
from darkhorse.infer.sampling import SamplingOptions
from darkhorse.model import Transformer

REASONING, ANSWER = "reasoning", "answer"  # the two parts of a chat reply
DIM, RESET = "\x1b[2m", "\x1b[0m"  # ANSI, used only when writing to a terminal
THINKING = "(thinking...)"
ERASE_THINKING = "\b" * len(THINKING) + "\x1b[K"  # back over the status, clear to the end of the line


class TextCodec(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...

    @property
    def vocab_size(self) -> int: ...


class TextDelta:
    """Incremental decoding: the new text each id adds, holding back bytes of a half-finished character.

    Each push decodes only a short window, from the start of the piece emitted last (so a decoder that
    strips or merges at a boundary sees the same context as the whole text) to the newest id, not the
    whole reply again: a long stream costs linear, not quadratic, decode work."""

    def __init__(self, tokenizer: TextCodec) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.window_start = 0  # a character boundary: the first id of the piece emitted last
        self.emitted_end = 0  # the ids before this index are emitted
        self.window_text = ""  # decode(ids[window_start:emitted_end])

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids[self.window_start :])
        if text.endswith("\ufffd") or len(text) <= len(self.window_text):
            return ""
        new = text[len(self.window_text) :]
        self.window_start, self.emitted_end = self.emitted_end, len(self.ids)
        self.window_text = self.tokenizer.decode(self.ids[self.window_start :])
        return new


def stream_text(tokenizer: TextCodec, ids: Iterable[int]) -> Iterator[str]:
    """Turn a stream of ids into text pieces, holding back bytes of a half-finished character."""
    delta = TextDelta(tokenizer)
    for token_id in ids:
        piece = delta.push(token_id)
        if piece:
            yield piece


class ReplySplitter:
    """A chat reply's (part, text) pieces as its ids arrive one by one; part is REASONING or ANSWER.

    The think markers of the tokenizer's chat format switch the part; special tokens are never text, so
    none reaches the pieces (`<|/think|><|assistant|>` between reasoning and answer included). Each part's
    leading whitespace is dropped. `opened_think`: the prompt left the model inside a think block."""

    def __init__(self, tokenizer, *, opened_think: bool) -> None:
        self.tokenizer = tokenizer
        self.opening, self.closing = think_marker_ids(tokenizer)
        self.hidden = tokenizer.special_ids
        self.part = REASONING if opened_think else ANSWER
        self.delta, self.started = TextDelta(tokenizer), False

    def push(self, token_id: int) -> tuple[str, str] | None:
        """The piece `token_id` adds, or None when it adds no text."""
        if token_id in self.opening or token_id in self.closing:
            self.part = REASONING if token_id in self.opening else ANSWER
            self.delta, self.started = TextDelta(self.tokenizer), False
            return None
        if token_id in self.hidden:
            return None
        piece = self.delta.push(token_id)
        if not self.started:
            piece = piece.lstrip()
        if not piece:
            return None
        self.started = True
        return self.part, piece


def stream_reply(tokenizer, ids: Iterable[int], *, opened_think: bool) -> Iterator[tuple[str, str]]:
    """A chat reply's (part, text) pieces as its ids arrive (see `ReplySplitter`)."""
    splitter = ReplySplitter(tokenizer, opened_think=opened_think)
    for token_id in ids:
        piece = splitter.push(token_id)
        if piece is not None:
            yield piece


def print_reply(
    pieces: Iterable[tuple[str, str]], out: TextIO, *, show_thinking: bool = True, color: bool = False
) -> tuple[str | None, str]:
    """Write a streaming reply to `out` and return its (reasoning or None, answer).

    Shown reasoning is labelled `thinking:` (dim with `color`) on lines of its own before the answer;
    hidden reasoning shows only a `(thinking...)` status on a terminal, erased when the answer starts."""
    parts: dict[str, list[str]] = {REASONING: [], ANSWER: []}
    status = False
    for part, piece in pieces:
        first = not parts[part]
        parts[part].append(piece)
        if part == REASONING and show_thinking:
            label = "thinking: " if first else ""
            out.write(f"{DIM}{label}{piece}{RESET}" if color else label + piece)
        elif part == REASONING:
            if color and not status:
                out.write(f"{DIM}{THINKING}{RESET}")
                status = True
        else:
            if status:
                out.write(ERASE_THINKING)
                status = False
            if first and parts[REASONING] and show_thinking:
                out.write("\n")
            out.write(piece)
        out.flush()
    if status:
        out.write(ERASE_THINKING)
    out.write("\n")
    reasoning = "".join(parts[REASONING]).strip()
    return reasoning or None, "".join(parts[ANSWER]).strip()


def generate_text(model: Transformer, tokenizer: TextCodec, prompt: str, options: SamplingOptions) -> str:
    """Complete `prompt` and return only the new text."""
    ids = Engine(model, tokenizer.vocab_size).stream(tokenizer.encode(prompt), options)
    return "".join(stream_text(tokenizer, ids))


def prepare_prompt(tokenizer, text: str, chat: bool = False, think: bool = True) -> tuple[str, list[int]]:
    """(text, ids) of a user's prompt: as a user turn in the model's chat format with `chat`, else as it is;
    either way what the user typed is encoded as plain text (no special token can be forged in it)."""
    if chat:
        return encode_chat_prompt(tokenizer, [{"role": "user", "content": text}], think=think)
    return text, tokenizer.encode_text(text)


def stream_completion(
    model: Transformer,
    tokenizer,
    prompt: tuple[str, list[int]],
    options: SamplingOptions,
    out: TextIO | None = None,
    chat: bool = False,
    engine: Engine | None = None,
) -> str:
    """Print the completion of `prompt` (its text and ids: `prepare_prompt`) as it is generated and return its
    text (decoded by `engine`, by default a new one).

    Plain text stops at the tokenizer's eos. A chat reply also stops at the end of the assistant turn and is
    printed as `print_reply` prints it (reasoning, then the answer, no special tokens); its answer is returned."""
    out = out or sys.stdout  # looked up per call: tests and callers may swap sys.stdout
    stop_ids = chat_stop_ids(tokenizer) if chat else {tokenizer.eos_id}
    prompt_text, prompt_ids = prompt
    engine = engine or Engine(model, tokenizer.vocab_size)
    ids = engine.stream(prompt_ids, options, stop_ids=stop_ids)
    ids = takewhile(lambda i: i not in stop_ids, ids)
    if chat:
        pieces = stream_reply(tokenizer, ids, opened_think=prompt_opens_think(prompt_text))
        return print_reply(pieces, out, color=out.isatty())[1]
    pieces = []
    for piece in stream_text(tokenizer, ids):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    return "".join(pieces)
