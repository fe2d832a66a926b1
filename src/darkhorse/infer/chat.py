"""A multi-turn chat session and its REPL; prompts and stop ids come from infer/prompting.py, so a
model is prompted in the chat format it was trained on (darkhorse's, or an imported tokenizer's own).

Replies stream as they are decoded, reasoning apart from the answer (shown dim, or hidden), never a special
token, then a line with the token count and speed. When the conversation outgrows the model's context the
oldest turns are dropped with a notice (the system prompt stays). Commands never end the session: a bad
one prints one line and the chat goes on."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import takewhile
from pathlib import Path
from typing import TextIO

from darkhorse.data.chat_format import REASONING_KEYS, check_messages
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.errors import DarkhorseError
from darkhorse.files import atomic_file, read_json_object
from darkhorse.infer.engine import Engine
from darkhorse.infer.generate import DIM, RESET, print_reply, stream_reply
from darkhorse.infer.prompting import chat_stop_ids, encode_chat_prompt, prompt_opens_think
from darkhorse.infer.sampling import SamplingOptions

_UNDECODED = re.compile("[\udc80-\udcff]")  # how surrogateescape spells a byte that is not UTF-8
CONTINUE, BLOCK = "\\", '"""'  # multi-line input: a trailing backslash, or lines between two """ lines
HELP_TEXT = f"""commands:
  /think [on|off]      show or hide the model's reasoning (toggles without an argument)
  /reasoning on|off    ask the model to reason before answering, or to answer directly
  /system TEXT         set the system prompt and start over (/system alone removes it)
  /clear               forget the conversation, keep the system prompt (/reset does the same)
  /save [FILE]         write the conversation as JSON {{"messages": [...]}} (default chat-DATE-TIME.json)
  /load FILE           continue a conversation saved by /save (or any {{"messages": [...]}} file)
  /help                this list
  /quit                leave (/exit, Ctrl-D)
multi-line input: end a line with {CONTINUE} to continue it on the next, or put the text between two
lines of {BLOCK}. Ctrl-C stops a reply."""


def _switch(argument: str, current: bool, command: str) -> bool:
    """`on`/`off`, or the opposite of `current` without an argument."""
    if not argument:
        return not current
    if argument in ("on", "off"):
        return argument == "on"
    raise DarkhorseError(f"{command} takes on or off, not {argument!r}")


@dataclass
class ChatSession:
    """One conversation with a model. `think`: ask for reasoning; `show_thinking`: print it."""

    model: object
    tokenizer: Tokenizer
    options: SamplingOptions
    think: bool = True
    show_thinking: bool = False
    system: str | None = None
    history: list[dict] = field(default_factory=list)
    color: bool = False  # dim reasoning and status lines (a terminal)

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def note(self, out: TextIO, text: str) -> None:
        """A status line, in parentheses (dim on a terminal)."""
        out.write(f"{DIM}({text}){RESET}\n" if self.color else f"({text})\n")

    def _drop_oldest_turn(self) -> None:
        """Forget the first user message and everything up to the next one."""
        del self.history[0]
        while self.history and self.history[0]["role"] != "user":
            del self.history[0]

    def fit_prompt(self, out: TextIO) -> tuple[str, list[int]] | None:
        """The prompt for the next reply (the history ends with the user's message), dropping the oldest
        turns until it leaves room to answer; None, with a notice and nothing dropped, when the message
        does not fit the context even alone."""
        alone = self.messages()[: 1 if self.system else 0] + self.history[-1:]
        needed = len(encode_chat_prompt(self.tokenizer, alone, think=self.think)[1])
        if needed >= self.context:
            self.note(out, f"that message needs {needed} tokens but the context is {self.context}: shorten it")
            return None
        room = min(self.options.max_new_tokens, self.context // 2)  # tokens kept free for the reply
        dropped = 0
        while True:
            prompt, ids = encode_chat_prompt(self.tokenizer, self.messages(), think=self.think)
            if len(ids) + room <= self.context or len(self.history) <= 1:
                break
            self._drop_oldest_turn()
            dropped += 1
        if dropped:
            turns = f"{dropped} turn{'s' if dropped > 1 else ''}"
            self.note(out, f"context full: dropped the oldest {turns} to fit {self.context} tokens")
        return prompt, ids

    def reply(self, user_text: str, out: TextIO) -> str | None:
        """Stream the assistant's turn to `out` and keep it in the history; None if there is none to keep
        (the message did not fit, or Ctrl-C stopped the reply: the user's message is then forgotten too)."""
        self.history.append({"role": "user", "content": user_text})
        try:
            turn = self._generate(out)
        except BaseException:
            self.history.pop()
            raise
        if turn is None:
            self.history.pop()
            return None
        self.history.append(turn)
        return turn["content"]

    def _generate(self, out: TextIO) -> dict | None:
        fitted = self.fit_prompt(out)
        if fitted is None:
            return None
        prompt, prompt_ids = fitted
        stop_ids = chat_stop_ids(self.tokenizer)
        produced = 0

        def counted(ids: Iterator[int]) -> Iterator[int]:
            nonlocal produced
            for token_id in ids:
                produced += 1
                yield token_id

        started = time.perf_counter()
        ids = Engine(self.model, self.tokenizer.vocab_size).stream(prompt_ids, self.options, stop_ids=stop_ids)
        replied = takewhile(lambda i: i not in stop_ids, counted(ids))
        pieces = stream_reply(self.tokenizer, replied, opened_think=prompt_opens_think(prompt))
        out.write("assistant> ")
        try:
            reasoning, answer = print_reply(pieces, out, show_thinking=self.show_thinking, color=self.color)
        except KeyboardInterrupt:
            out.write("\n")
            self.note(out, "reply stopped; it is not kept")
            return None
        seconds = time.perf_counter() - started
        used = len(prompt_ids) + produced
        self.note(
            out,
            f"{produced} tokens, {produced / max(seconds, 1e-9):.1f} tokens/s, {seconds:.2f} s, "
            f"context {used}/{self.context}",
        )
        if reasoning and not answer:
            self.note(out, "the reply ended inside its reasoning; raise --max-new-tokens or use /reasoning off")
        turn = {"role": "assistant", "content": answer}
        if reasoning:
            turn["reasoning"] = reasoning
        return turn

    def save(self, name: str) -> Path:
        path = Path(name) if name else Path(f"chat-{datetime.now():%Y%m%d-%H%M%S}.json")
        with atomic_file(path, force=True) as temp:
            temp.write_text(json.dumps({"messages": self.messages()}, ensure_ascii=False, indent=1) + "\n")
        return path

    def load(self, name: str) -> int:
        """Replace the conversation with the one in file `name`; returns its number of messages."""
        if not name:
            raise DarkhorseError("/load needs a file name")
        try:
            data = read_json_object(name)
        except (OSError, UnicodeDecodeError) as exc:
            raise DarkhorseError(f"{name}: cannot read it ({exc.strerror or type(exc).__name__})") from None
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise DarkhorseError(f'{name}: not a conversation (expected {{"messages": [...]}} as /save writes)')
        try:
            check_messages(messages)
        except DarkhorseError as exc:
            raise DarkhorseError(f"{name}: not a conversation: {exc}") from None
        kept = ("role", "content", *REASONING_KEYS)
        messages = [{key: m[key] for key in kept if key in m} for m in messages]
        self.system = messages[0]["content"] if messages[0]["role"] == "system" else None
        self.history = messages[1:] if self.system is not None else messages
        return len(messages)

    def handle(self, text: str, out: TextIO) -> bool:
        """Run one input (a user message or a command); False means the user asked to quit. An error ends the
        turn, never the session: the conversation so far stays (and /save can still keep it)."""
        try:
            return self._handle(text, out)
        except DarkhorseError as exc:
            self.note(out, f"error: {exc}")
        except Exception as exc:  # a library's error on one turn (e.g. out of memory) must not lose the chat
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            self.note(out, f"error: {type(exc).__name__}: {first} (the conversation is kept; /save stores it)")
        return True

    def _handle(self, text: str, out: TextIO) -> bool:
        if not text.strip():
            return True
        if not text.startswith("/"):
            self.reply(text, out)
            return True
        command, _, argument = text.strip().partition(" ")
        argument = argument.strip()
        if command in ("/quit", "/exit"):
            return False
        if command in ("/clear", "/reset"):
            self.history.clear()
            self.note(out, "conversation cleared")
        elif command == "/think":
            self.show_thinking = _switch(argument, self.show_thinking, command)
            self.note(out, f"reasoning {'shown' if self.show_thinking else 'hidden'}")
        elif command == "/reasoning":
            self.think = _switch(argument, self.think, command)
            how = "on: the model reasons first" if self.think else "off: the model answers directly"
            self.note(out, f"reasoning {how}")
        elif command == "/system":
            self.system = argument or None
            self.history.clear()
            self.note(out, f"system prompt {'set' if self.system else 'removed'}; conversation cleared")
        elif command == "/save":
            self.note(out, f"saved {len(self.messages())} messages to {self.save(argument)}")
        elif command == "/load":
            self.note(out, f"loaded {self.load(argument)} messages from {argument}")
        elif command == "/help":
            out.write(HELP_TEXT + "\n")
        else:
            self.note(out, f"unknown command {command}")
            out.write(HELP_TEXT + "\n")
        return True


def read_message(read_line, interactive: bool) -> str | None:
    """One user input from `read_line(prompt)`, joining continued lines; None at end of input."""
    line = read_line("you> " if interactive else "")
    if line is None:
        return None
    if line.strip() == BLOCK:
        lines = []
        while (line := read_line("... " if interactive else "")) is not None and line.strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line is not None and line.endswith(CONTINUE):
        lines.append(line[: -len(CONTINUE)])
        line = read_line("... " if interactive else "")
    return "\n".join([*lines, line or ""])


def run_repl(session: ChatSession, stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    """Read messages and commands until /quit or end of input. A terminal gets prompts with line editing;
    piped input is read line by line (each line one message, with the same multi-line rules)."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty()
    if hasattr(stdin, "reconfigure"):  # bytes that are not UTF-8 arrive escaped, the stream keeps its place
        stdin.reconfigure(errors="surrogateescape")
    if interactive and stdin is sys.stdin:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())

    def read_line(prompt: str) -> str | None:
        if interactive and stdin is sys.stdin:
            try:
                return input(prompt)
            except EOFError:
                return None
        if prompt:
            out.write(prompt)
            out.flush()
        line = stdin.readline()
        return line.rstrip("\n") if line else None

    def read_text(prompt: str) -> str | None:
        line = read_line(prompt)
        if line is not None and _UNDECODED.search(line):
            session.note(out, "that line is not UTF-8 text; it was skipped")
            return ""
        return line

    if interactive:
        out.write("darkhorse chat: /help lists the commands, /quit leaves\n")
    while True:
        try:
            text = read_message(read_text, interactive)
        except KeyboardInterrupt:
            out.write("\n")
            return
        if text is None or not session.handle(text, out):
            return
