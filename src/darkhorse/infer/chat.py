"""A multi-turn chat session and its REPL; prompts and stop ids come from infer/prompting.py, so a
model is prompted in the chat format it was trained on (darkhorse's, or an imported tokenizer's own)."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from typing import TextIO

from darkhorse.data.tokenizer import Tokenizer
from darkhorse.infer.generate import stream_completion
from darkhorse.infer.prompting import render_chat_prompt, split_reply

COMMANDS_HELP = "/reset clears the conversation, /think on|off toggles reasoning, /system TEXT sets it, /quit exits"


@dataclass
class ChatSession:
    model: object
    tokenizer: Tokenizer
    options: dict
    think: bool = True
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reply(self, user_text: str, out: TextIO | None = None) -> str:
        """Generate the assistant's turn (streamed to `out`), keep its answer in the history."""
        self.history.append({"role": "user", "content": user_text})
        prompt = render_chat_prompt(self.tokenizer, self.messages(), think=self.think)
        completion = stream_completion(
            self.model, self.tokenizer, prompt, self.options, out or io.StringIO(), chat=True
        )
        reasoning, answer = split_reply(self.tokenizer, completion)
        turn = {"role": "assistant", "content": answer}
        if reasoning:
            turn["reasoning"] = reasoning
        self.history.append(turn)
        return answer

    def handle(self, line: str, out: TextIO) -> bool:
        """Run one input line; False means the user asked to quit."""
        text = line.strip()
        if not text:
            return True
        if text in ("/quit", "/exit"):
            return False
        if text == "/reset":
            self.history.clear()
            out.write("(conversation cleared)\n")
        elif text.startswith("/think"):
            self.think = text.split()[-1] != "off"
            out.write(f"(reasoning {'on' if self.think else 'off'})\n")
        elif text.startswith("/system"):
            self.system = text[len("/system") :].strip() or None
            self.history.clear()
            out.write("(system prompt set; conversation cleared)\n")
        elif text.startswith("/"):
            out.write(f"(unknown command; {COMMANDS_HELP})\n")
        else:
            out.write("assistant> ")
            self.reply(text, out)
        return True


def run_repl(session: ChatSession, stdin: TextIO | None = None, out: TextIO | None = None) -> None:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty()
    if interactive:
        out.write(f"darkhorse chat. {COMMANDS_HELP}\n")
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = stdin.readline()
        if not line or not session.handle(line, out):
            return
