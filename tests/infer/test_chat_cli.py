"""`darkhorse chat` as a person uses it: through piped stdin, and in a real terminal (tmux: keys sent, the
pane captured and read as a person sees it), on a darkhorse checkpoint and on an imported model that
brings its own (Llama-3-style) chat template."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

DARKHORSE = [sys.executable, "-m", "darkhorse"]  # this checkout (conftest puts its src/ on PYTHONPATH)
LONG = " ".join(["one two three four"] * 12)  # ~50 tokens: five of them fill the tiny model's 256


def chat(checkpoint: Path, stdin: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [*DARKHORSE, "chat", "--checkpoint", str(checkpoint), *args]
    return subprocess.run(command, capture_output=True, text=True, input=stdin, timeout=180, cwd=cwd)


def test_piped_chat_streams_answers_commands_and_survives_bad_ones(tiny_dense_checkpoint, tmp_path):
    script = "\n".join(
        ["/think", "after one?", "/bogus", "/load missing.json", "/reasoning off", "after \\", "two?",
         "/save talk.json", "/clear", "/load talk.json", "after three?", "/quit", "never read"]
    )  # fmt: skip
    result = chat(tiny_dense_checkpoint, script + "\n", "--max-new-tokens", "6", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    out = result.stdout
    assert out.count("assistant> ") == 3 and out.count(" tokens/s, ") == 3
    assert "(reasoning shown)" in out and "thinking: " in out  # reasoning on until /reasoning off, then shown
    assert "(unknown command /bogus)\ncommands:\n  /think" in out
    assert "(error: missing.json: cannot read it (No such file or directory))" in out
    assert "(saved 4 messages to talk.json)" in out and "(loaded 4 messages from talk.json)" in out
    assert json.loads((tmp_path / "talk.json").read_text())["messages"][2]["content"] == "after \ntwo?"
    assert "<|" not in out and "never read" not in out


def test_generate_chat_prints_reasoning_and_answer_without_special_tokens(tiny_dense_checkpoint):
    command = [*DARKHORSE, "generate", "--checkpoint", str(tiny_dense_checkpoint), "--chat", "--prompt", "after one?"]
    result = subprocess.run([*command, "--max-new-tokens", "6"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("thinking: ") and "<|" not in result.stdout


def test_chat_help_is_true_to_the_repl_and_the_code():
    from darkhorse.commands import chat as chat_command
    from darkhorse.infer.chat import HELP_TEXT

    shown = subprocess.run([*DARKHORSE, "chat", "--help"], capture_output=True, text=True, timeout=60).stdout
    for command in ("/think", "/reasoning", "/system", "/clear", "/reset", "/save", "/load", "/help", "/quit"):
        assert command in HELP_TEXT and command in shown
    assert f"(default {chat_command.MAX_NEW_TOKENS})" in " ".join(shown.split())
    assert "--show-thinking" in shown


@pytest.fixture
def imported_llama(tmp_path, foreign_tokenizer) -> Path:
    """A random LlamaForCausalLM (context 64) with a Llama-3-style tokenizer and template, imported."""
    from darkhorse.interop.hf_import import import_hf

    transformers = pytest.importorskip("transformers")
    root = tmp_path
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(root / "hf"))
    foreign_tokenizer(root / "hf")
    return import_hf(root / "hf", root / "imported")


def test_imported_model_chats_in_its_own_template_without_special_tokens(imported_llama):
    turns = "\n".join(["one two three four five six seven eight"] * 4 + ["/think", "one two?"]) + "\n"
    sampled = ("--temperature", "1", "--seed", "0")
    result = chat(imported_llama, turns, "--max-new-tokens", "12", "--show-thinking", *sampled)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    out = result.stdout
    assert out.count("assistant> ") == 5 and out.count(" tokens/s, ") == 5
    # a random model writes Llama 3's header tokens freely: none may reach the screen
    assert "<|" not in out and "header_id" not in out
    assert "(context full: dropped the oldest" in out and "/64)" in out  # the model's context is 64


# -- a real terminal --------------------------------------------------------------------------------------


class Tmux:
    """One command in a detached tmux session on a private server, read back as its pane shows it."""

    def __init__(self, name: str, command: str, env: dict[str, str]) -> None:
        self.base = ["tmux", "-L", name]
        self.name = name
        exports = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
        self.run("new-session", "-d", "-s", name, "-x", "150", "-y", "60", f"env {exports} {command}; sleep 60")

    def run(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, check=True, timeout=30).stdout

    def send(self, text: str) -> None:
        self.run("send-keys", "-t", self.name, "-l", text)
        self.run("send-keys", "-t", self.name, "Enter")

    def screen(self, escapes: bool = False) -> str:
        return self.run("capture-pane", "-p", "-J", "-S", "-", *(["-e"] if escapes else []), "-t", self.name)

    def wait_for(self, text: str, count: int = 1, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} (x{count}) never appeared; the pane shows:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=30)


@pytest.mark.slow  # a chat process in a terminal, a dozen replies
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_chat_in_a_real_terminal(tiny_dense_checkpoint):
    command = shlex.join([*DARKHORSE, "chat", "--checkpoint", str(tiny_dense_checkpoint), "--max-new-tokens", "8"])
    env = {"PYTHONPATH": os.environ["PYTHONPATH"], "TERM": "xterm-256color", "OMP_NUM_THREADS": "1"}
    terminal = Tmux(f"darkhorse-chat-{os.getpid()}", command + " --show-thinking", env)
    try:
        terminal.wait_for("you> ")
        terminal.send("/help")
        terminal.wait_for("/quit                leave")
        terminal.send("after one?")  # reasoning on and shown: the tiny model thinks until its budget ends
        terminal.wait_for("tokens/s")
        terminal.send("/reasoning off")
        terminal.send("after \\")  # multi-line: the continuation prompt, then one message
        terminal.wait_for("... ")
        terminal.send("two?")
        terminal.wait_for("tokens/s", count=2)
        for turn in range(5):
            terminal.send(LONG)
            terminal.wait_for("tokens/s", count=3 + turn)
        screen = terminal.wait_for("(context full: dropped the oldest")
        colored = terminal.screen(escapes=True)
        terminal.send("/quit")
    finally:
        terminal.close()
    assert "darkhorse chat: /help lists the commands" in screen
    assert "assistant> thinking: " in screen and "(reasoning on: the model reasons first)" not in screen
    assert "(reasoning off: the model answers directly)" in screen
    assert "you> after \\\n... two?" in screen
    assert "<|" not in screen  # no special token, ever
    assert "\x1b[2m" in colored  # reasoning and status lines are dim in a terminal
