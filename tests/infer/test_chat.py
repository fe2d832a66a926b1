"""The chat session in-process: replies split into reasoning and answer with no special token shown, multi-line
input, context overflow dropping the oldest turns, /save and /load, and bad commands that keep the chat going."""

from __future__ import annotations

import io
import json

import pytest

from darkhorse.checkpoint import load_for_inference
from darkhorse.data.tokenizer import ASSISTANT, ASSISTANT_END, THINK_END, Tokenizer
from darkhorse.infer.chat import HELP_TEXT, ChatSession, read_message, run_repl
from darkhorse.infer.generate import ANSWER, REASONING, print_reply, stream_reply
from darkhorse.infer.sampling import SamplingOptions


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["add twenty and thirty. The answer is 50."] * 20, vocab_size=300)


def test_reply_splits_at_the_think_markers_and_never_shows_special_tokens(tokenizer):
    ids = tokenizer.encode("add twenty and thirty") + [tokenizer.token_to_id(t) for t in (THINK_END, ASSISTANT)]
    ids += tokenizer.encode(" The answer is 50.") + [tokenizer.token_to_id(ASSISTANT_END)]
    pieces = list(stream_reply(tokenizer, ids, opened_think=True))
    assert "".join(text for part, text in pieces if part == REASONING) == "add twenty and thirty"
    assert "".join(text for part, text in pieces if part == ANSWER) == "The answer is 50."

    shown, hidden = io.StringIO(), io.StringIO()
    assert print_reply(iter(pieces), shown, show_thinking=True) == ("add twenty and thirty", "The answer is 50.")
    assert shown.getvalue() == "thinking: add twenty and thirty\nThe answer is 50.\n"
    assert print_reply(iter(pieces), hidden, show_thinking=False)[1] == "The answer is 50."
    assert hidden.getvalue() == "The answer is 50.\n"  # hidden reasoning leaves no trace off a terminal
    # without a think block in the prompt the reply is all answer
    assert {part for part, _ in stream_reply(tokenizer, tokenizer.encode("fifty"), opened_think=False)} == {ANSWER}


def test_foreign_reply_hides_its_special_tokens(tmp_path, foreign_tokenizer):
    tok = Tokenizer.from_file(foreign_tokenizer(tmp_path))
    ids = tok.encode("one two") + [tok.token_to_id("<|start_header_id|>")] + tok.encode(" three")
    out = io.StringIO()
    assert print_reply(stream_reply(tok, ids, opened_think=False), out) == (None, "one two three")
    assert "<|" not in out.getvalue()


def test_multi_line_input_by_backslash_or_triple_quotes():
    def reader(*lines):
        feed = iter(lines)
        return lambda prompt: next(feed, None)

    assert read_message(reader("first \\", "second \\", "third", "next"), False) == "first \nsecond \nthird"
    assert read_message(reader('"""', "a", "", "b", '"""', "next"), False) == "a\n\nb"
    assert read_message(reader(None), False) is None


@pytest.fixture
def session(tiny_dense_checkpoint):
    model, tokenizer, _ = load_for_inference(tiny_dense_checkpoint)
    return ChatSession(model, tokenizer, SamplingOptions(max_new_tokens=8), think=False, system="be brief")


def test_context_overflow_drops_the_oldest_turns_and_keeps_the_system_prompt(session):
    out = io.StringIO()
    long_message = " ".join(["one two three four"] * 12)  # ~50 tokens; the model's context is 256
    for _ in range(6):
        assert session.handle(long_message, out)
    text = out.getvalue()
    assert "(context full: dropped the oldest 1 turn to fit 256 tokens)" in text
    assert session.messages()[0] == {"role": "system", "content": "be brief"}
    assert session.history[0]["role"] == "user" and len(session.history) < 12
    assert text.count("tokens/s, ") == 6 and "<|" not in text

    session.handle("one " * 300, out)  # alone longer than the context: a notice, and the chat goes on
    assert "that message needs" in out.getvalue() and session.history[-1]["role"] == "assistant"
    assert session.handle("after one?", out) and session.history[-2]["content"] == "after one?"


def test_save_load_round_trip_and_bad_files_keep_the_chat_going(session, tmp_path, monkeypatch):
    out = io.StringIO()
    session.handle("after one?", out)
    saved = tmp_path / "talk.json"
    session.handle(f"/save {saved}", out)
    record = json.loads(saved.read_text())
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
    monkeypatch.chdir(tmp_path)
    session.handle("/save", out)  # default name
    assert len(list(tmp_path.glob("chat-*.json"))) == 1

    session.handle("/clear", out)
    assert session.history == [] and session.system == "be brief"
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "roles.json").write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}))
    (tmp_path / "text.json").write_text("not json at all")
    for bad, expected in (
        ("list.json", "expected a JSON object"),
        ("roles.json", "not a conversation: message 0 has role 'robot'"),
        ("text.json", "text.json:1: invalid JSON"),
        ("missing.json", "cannot read it"),
        ("", "/load needs a file name"),
    ):
        out = io.StringIO()
        assert session.handle(f"/load {bad}".strip(), out)
        assert out.getvalue().count("\n") == 1 and expected in out.getvalue(), out.getvalue()
    assert session.history == []

    session.handle(f"/load {saved}", out)
    assert session.messages() == record["messages"]
    session.handle("/system", out)
    assert session.system is None and session.history == []


def test_unknown_command_shows_help_and_the_repl_goes_on(session):
    out = io.StringIO()
    run_repl(session, stdin=io.StringIO("/bogus\n/think maybe\n/think\nafter one?\n/quit\nafter two?\n"), out=out)
    text = out.getvalue()
    assert "(unknown command /bogus)\n" + HELP_TEXT in text
    assert "(error: /think takes on or off, not 'maybe')" in text and "(reasoning shown)" in text
    assert text.count("assistant> ") == 1  # /quit ended it before the last message


def test_bytes_that_are_not_utf8_skip_one_line_and_the_chat_goes_on(session):
    session.history.clear()
    stdin = io.TextIOWrapper(io.BytesIO(b'one two\n\xff\xfe bad \xc3\n"""\nthree \xff\n"""\nfour\n'), encoding="utf-8")
    out = io.StringIO()
    run_repl(session, stdin, out)
    assert out.getvalue().count("(that line is not UTF-8 text; it was skipped)") == 2
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["one two", "four"]


def test_a_library_error_on_one_turn_keeps_the_conversation(session, monkeypatch):
    session.history.clear()
    out = io.StringIO()
    assert session.handle("one two", out) and len(session.history) == 2

    def broken(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory\nsecond line")

    monkeypatch.setattr("darkhorse.infer.chat.Engine.stream", broken)
    assert session.handle("three four", out)
    assert "(error: RuntimeError: DefaultCPUAllocator: not enough memory (the conversation is kept" in out.getvalue()
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["one two"]
