"""Chat layout: exact rendering, prompts that prefix the training text, parsing, and the Jinja twin."""

from __future__ import annotations

import pytest

from darkhorse.data.chat_format import (
    assistant_spans,
    jinja_chat_template,
    parse_reply,
    render_conversation,
    render_prompt,
)
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.errors import DarkhorseError

SYSTEM = {"role": "system", "content": "Be brief."}
ASK = {"role": "user", "content": "What is 17 + 25?"}
ANSWER = {"role": "assistant", "content": "42"}
FOLLOW_UP = {"role": "user", "content": "And 2 + 2?"}
SECOND = {"role": "assistant", "content": "4"}


def test_single_turn_with_reasoning_renders_the_documented_layout():
    text = render_conversation([SYSTEM, ASK, ANSWER], reasoning="7+5=12, carry 1.")
    assert text == (
        "<|bos|><|system|>Be brief.<|/system|><|user|>What is 17 + 25?<|/user|>"
        "<|think|>7+5=12, carry 1.<|/think|><|assistant|>42<|/assistant|><|eos|>"
    )


def test_no_reasoning_and_no_system_uses_no_think():
    text = render_conversation([ASK, ANSWER])
    assert text == "<|bos|><|user|>What is 17 + 25?<|/user|><|no_think|><|assistant|>42<|/assistant|><|eos|>"


def test_reasoning_can_ride_on_the_last_assistant_message():
    for key in ("reasoning", "reasoning_content", "thinking"):
        assert render_conversation([ASK, {**ANSWER, key: "r"}]) == render_conversation([ASK, ANSWER], reasoning="r")


def test_multi_turn_keeps_only_the_last_turns_reasoning():
    messages = [SYSTEM, ASK, {**ANSWER, "reasoning": "old thoughts"}, FOLLOW_UP, SECOND]
    text = render_conversation(messages, reasoning="2+2=4")
    assert "old thoughts" not in text
    assert text.count("<|no_think|>") == 1 and text.count("<|think|>") == 1
    assert text.endswith("<|user|>And 2 + 2?<|/user|><|think|>2+2=4<|/think|><|assistant|>4<|/assistant|><|eos|>")


@pytest.mark.parametrize("reasoning", ["2+2=4", None])
def test_training_text_is_the_inference_prompt_plus_the_reply(reasoning):
    messages = [SYSTEM, ASK, ANSWER, FOLLOW_UP, SECOND]
    prompt = render_prompt(messages[:-1], think=reasoning is not None)
    text = render_conversation(messages, reasoning=reasoning)
    assert text.startswith(prompt)
    assert parse_reply(text[len(prompt) :]) == (reasoning, "4")


def test_prompt_ends_inside_the_think_block_or_after_the_assistant_tag():
    assert render_prompt([ASK]).endswith("<|/user|><|think|>")
    assert render_prompt([ASK], think=False).endswith("<|/user|><|no_think|><|assistant|>")


def test_parse_reply_handles_continuations_whole_texts_and_truncation():
    assert parse_reply("carry the 1<|/think|><|assistant|> 42 <|/assistant|><|eos|>junk") == ("carry the 1", "42")
    assert parse_reply("42<|/assistant|>") == (None, "42")
    assert parse_reply(render_conversation([ASK, ANSWER], reasoning="r")) == ("r", "42")
    assert parse_reply("still thinking") == (None, "still thinking")


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "at least one message"),
        ([{"role": "tool", "content": "x"}, ANSWER], "role 'tool'"),
        ([ASK, SYSTEM, ANSWER], "system message may only come first"),
        ([ASK, {"role": "assistant"}], "no text 'content'"),
        ([ASK], "must end with an assistant message"),
    ],
)
def test_malformed_conversations_are_clear_errors(messages, message):
    with pytest.raises(DarkhorseError, match=message):
        render_conversation(messages)


def test_prompt_after_an_assistant_turn_is_an_error():
    with pytest.raises(DarkhorseError, match="must end with a user"):
        render_prompt([ASK, ANSWER])


def test_rendered_chat_encodes_with_special_ids():
    tokenizer = Tokenizer.train([render_conversation([ASK, ANSWER], reasoning="r")] * 5, vocab_size=300)
    ids = tokenizer.encode(render_conversation([ASK, ANSWER], reasoning="r"))
    special = tokenizer.special_tokens
    assert ids[0] == special["<|bos|>"] and ids[-1] == special["<|eos|>"]
    assert special["<|think|>"] in ids and special["<|/assistant|>"] in ids


@pytest.fixture(scope="module")
def chat_tokenizer():
    return Tokenizer.train([render_conversation([SYSTEM, ASK, ANSWER], reasoning="7+5=12")] * 5, vocab_size=300)


def _assistant_text(tokenizer: Tokenizer, text: str) -> list[str]:
    ids = tokenizer.encode(text)
    return [tokenizer.decode(ids[start:end]) for start, end in assistant_spans(ids, tokenizer.special_tokens)]


@pytest.mark.parametrize("reasoning", ["7+5=12, carry 1.", None])
def test_assistant_span_is_exactly_what_follows_the_prompt(chat_tokenizer, reasoning):
    messages = [SYSTEM, ASK, ANSWER]
    text = render_conversation(messages, reasoning=reasoning)
    prompt = render_prompt(messages[:-1], think=reasoning is not None)
    assert _assistant_text(chat_tokenizer, text) == [text.removeprefix(prompt)]
    expected = "7+5=12, carry 1.<|/think|><|assistant|>42" if reasoning else "42"
    assert text.removeprefix(prompt) == f"{expected}<|/assistant|><|eos|>"  # think block included, eos too


def test_every_assistant_turn_of_a_conversation_is_a_span(chat_tokenizer):
    text = render_conversation([SYSTEM, ASK, ANSWER, FOLLOW_UP, SECOND], reasoning="2+2=4")
    assert _assistant_text(chat_tokenizer, text) == [
        "42<|/assistant|>",
        "2+2=4<|/think|><|assistant|>4<|/assistant|><|eos|>",
    ]


def test_a_reply_cut_short_runs_to_the_end_and_a_bare_prompt_has_none(chat_tokenizer):
    prompt = render_prompt([ASK])
    assert _assistant_text(chat_tokenizer, prompt + "7+5") == ["7+5"]
    assert _assistant_text(chat_tokenizer, prompt) == []
    assert _assistant_text(chat_tokenizer, render_prompt([ASK], think=False)) == []
    assert _assistant_text(chat_tokenizer, "plain text, no turns") == []


CONVERSATIONS = [
    [ASK, ANSWER],
    [SYSTEM, ASK, {**ANSWER, "reasoning_content": "carry"}],
    [SYSTEM, ASK, {**ANSWER, "thinking": "old"}, FOLLOW_UP, {**SECOND, "reasoning": "new"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train(["hello world 123"] * 5, vocab_size=280).save(path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    hf.chat_template = jinja_chat_template()
    return hf


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_jinja_template_renders_the_same_conversation_text(hf_tokenizer, messages):
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == render_conversation(messages)


@pytest.mark.parametrize("messages", [conversation[:-1] for conversation in CONVERSATIONS])
@pytest.mark.parametrize("think", [True, False])
def test_jinja_generation_prompt_matches_render_prompt(hf_tokenizer, messages, think):
    rendered = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=think
    )
    assert rendered == render_prompt(messages, think=think)


def test_jinja_generation_prompt_thinks_by_default(hf_tokenizer):
    rendered = hf_tokenizer.apply_chat_template([ASK], tokenize=False, add_generation_prompt=True)
    assert rendered == render_prompt([ASK])
