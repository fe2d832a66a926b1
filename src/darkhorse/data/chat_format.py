"""The chat layout: the one place that decides how a conversation becomes text.

One turn with reasoning renders as

    <|bos|><|system|>S<|/system|><|user|>U<|/user|><|think|>R<|/think|><|assistant|>A<|/assistant|><|eos|>

The system block is left out when there is no system message, and `<|no_think|>` stands in for the think
block when a turn has no reasoning. Multi-turn conversations repeat the user/assistant pair; only the
final assistant turn keeps its reasoning, earlier turns render `<|no_think|>` (as Qwen3 and DeepSeek-R1
drop old thoughts). That way the training text of a conversation is exactly the prompt a model sees at
inference for its last turn (`render_prompt(messages[:-1])`) plus the reply, so what is trained is what
is asked.

Messages are `{"role": "system"|"user"|"assistant", "content": str}`; an assistant message may carry its
reasoning under "reasoning", "reasoning_content" or "thinking". `jinja_chat_template()` renders the same
text inside transformers' `apply_chat_template` (and llama.cpp, which reads it from GGUF), with
`enable_thinking` choosing the generation prompt, as in Qwen3.

`conversation_parts` / `prompt_parts` give the same text in pieces, our markup apart from message text,
so that `Tokenizer.encode_parts` can encode what a user wrote as plain text: `<|/user|>` typed in a
message stays characters, it never closes the turn.

`assistant_spans` finds, in the token ids of a rendered conversation, the part each assistant turn writes
(what response-only training puts its loss on): everything after the prompt's opening through the end
marker, i.e. `R<|/think|><|assistant|>A<|/assistant|>` after `<|think|>`, or `A<|/assistant|>` after
`<|no_think|><|assistant|>`, plus the final `<|eos|>`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from darkhorse.data.tokenizer import (
    ASSISTANT,
    ASSISTANT_END,
    BOS,
    EOS,
    NO_THINK,
    SYSTEM,
    SYSTEM_END,
    THINK,
    THINK_END,
    USER,
    USER_END,
)
from darkhorse.errors import DarkhorseError

Message = Mapping[str, Any]
Part = tuple[str, bool]  # (text, is markup): rendered chat as pieces, so message text is never read as markup
REASONING_KEYS = ("reasoning", "reasoning_content", "thinking")


def message_reasoning(message: Message) -> str | None:
    """The reasoning an assistant message carries, under any of the names datasets use."""
    for key in REASONING_KEYS:
        value = message.get(key)
        if value:
            return str(value)
    return None


def check_messages(messages: Sequence[Message]) -> None:
    """Refuse what is not a conversation, naming the first bad message."""
    if not messages:
        raise DarkhorseError("a conversation needs at least one message")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DarkhorseError(f"message {index} is not an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise DarkhorseError(f"message {index} has role {role!r}; expected system, user or assistant")
        if role == "system" and index != 0:
            raise DarkhorseError(f"message {index}: a system message may only come first")
        if not isinstance(content, str):
            raise DarkhorseError(f"message {index} ({role}) has no text 'content'")


def _turn_parts(messages: Sequence[Message], final_reasoning: str | None) -> list[Part]:
    """Everything after <|bos|>; the last assistant message gets `final_reasoning`."""
    parts: list[Part] = []
    last = len(messages) - 1
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            parts += [(SYSTEM, True), (content, False), (SYSTEM_END, True)]
        elif role == "user":
            parts += [(USER, True), (content, False), (USER_END, True)]
        else:
            reasoning = final_reasoning if index == last else None
            parts += [(THINK, True), (reasoning, False), (THINK_END, True)] if reasoning else [(NO_THINK, True)]
            parts += [(ASSISTANT, True), (content, False), (ASSISTANT_END, True)]
    return [(text, markup) for text, markup in parts if text]


def conversation_parts(messages: Sequence[Message], reasoning: str | None = None) -> list[Part]:
    """`render_conversation` as parts: markup we wrote (True) and message text (False), which is
    encoded as plain text so a `<|user|>` typed inside a message can never become a control token."""
    check_messages(messages)
    if messages[-1]["role"] != "assistant":
        raise DarkhorseError("a conversation must end with an assistant message")
    if reasoning is None:
        reasoning = message_reasoning(messages[-1])
    return [(BOS, True), *_turn_parts(messages, reasoning), (EOS, True)]


def prompt_parts(messages: Sequence[Message], think: bool = True) -> list[Part]:
    """`render_prompt` as parts (see `conversation_parts`)."""
    check_messages(messages)
    if messages[-1]["role"] == "assistant":
        raise DarkhorseError("a prompt must end with a user (or system) message, not an assistant reply")
    opening = [(THINK, True)] if think else [(NO_THINK, True), (ASSISTANT, True)]
    return [(BOS, True), *_turn_parts(messages, None), *opening]


def render_conversation(messages: Sequence[Message], reasoning: str | None = None) -> str:
    """Training text for a whole conversation, ending with an assistant reply and <|eos|>.

    `reasoning` (or the final assistant message's own reasoning field) fills its think block."""
    return "".join(text for text, _ in conversation_parts(messages, reasoning))


def render_prompt(messages: Sequence[Message], think: bool = True) -> str:
    """The prefix a model continues to write the next assistant turn.

    Ends right after <|think|> when `think`, else after <|no_think|><|assistant|>."""
    return "".join(text for text, _ in prompt_parts(messages, think))


def parse_reply(text: str) -> tuple[str | None, str]:
    """Split generated text into (reasoning, answer); reasoning is None when there is no think block.

    Works on a continuation of `render_prompt` (which may start inside the think block) and on a whole
    rendered conversation (the last turn is parsed). Text after the answer's end marker is ignored;
    an unfinished think block (no <|/think|>) is returned as the answer, since it cannot be split."""
    reasoning = None
    if THINK_END in text:
        before, text = text.rsplit(THINK_END, 1)
        reasoning = before.rsplit(THINK, 1)[-1].strip()
    if ASSISTANT in text:
        text = text.rsplit(ASSISTANT, 1)[1]
    for marker in (ASSISTANT_END, EOS):
        text = text.split(marker, 1)[0]
    return reasoning, text.strip()


def assistant_spans(ids: Sequence[int], special_ids: Mapping[str, int]) -> list[tuple[int, int]]:
    """Half-open [start, end) token ranges the assistant writes in a rendered conversation's `ids`.

    A turn's span starts right after the prompt's opening (`<|think|>`, or `<|no_think|><|assistant|>`:
    exactly where `render_prompt` hands over to the model) and ends after its `<|/assistant|>`, taking a
    following `<|eos|>` too, since the model must learn to stop. A reply cut off before its end marker runs
    to the end of `ids`. `special_ids` maps the special tokens to ids (`Tokenizer.special_tokens`).
    A plain loop: records are short, and per record it is ~10x faster than numpy's call overhead."""
    think, no_think = special_ids[THINK], special_ids[NO_THINK]
    assistant, assistant_end, eos = special_ids[ASSISTANT], special_ids[ASSISTANT_END], special_ids[EOS]
    markers = {think, no_think, assistant_end}
    length = len(ids)
    spans: list[tuple[int, int]] = []
    start = None
    for position, token in enumerate(ids):
        if token not in markers:
            continue
        if start is None and token == think:
            start = position + 1
        elif start is None and token == no_think and position + 1 < length and ids[position + 1] == assistant:
            start = position + 2
        elif start is not None and token == assistant_end:
            end = position + 2 if position + 1 < length and ids[position + 1] == eos else position + 1
            spans.append((start, end))
            start = None
    if start is not None and start < length:
        spans.append((start, length))
    return spans


def jinja_chat_template() -> str:
    """A Jinja2 chat template rendering exactly `render_conversation` / `render_prompt` text."""
    return (
        "{{- '" + BOS + "' -}}"
        "{%- set last_index = messages | length - 1 -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        "{{- '" + SYSTEM + "' + message['content'] + '" + SYSTEM_END + "' -}}"
        "{%- elif message['role'] == 'user' -%}"
        "{{- '" + USER + "' + message['content'] + '" + USER_END + "' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- set reasoning = message.get('reasoning') or message.get('reasoning_content')"
        " or message.get('thinking') or '' -%}"
        "{%- if loop.index0 == last_index and reasoning -%}"
        "{{- '" + THINK + "' + reasoning + '" + THINK_END + "' -}}"
        "{%- else -%}"
        "{{- '" + NO_THINK + "' -}}"
        "{%- endif -%}"
        "{{- '" + ASSISTANT + "' + message['content'] + '" + ASSISTANT_END + "' -}}"
        "{%- if loop.index0 == last_index -%}{{- '" + EOS + "' -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{%- if enable_thinking is defined and not enable_thinking -%}"
        "{{- '" + NO_THINK + ASSISTANT + "' -}}"
        "{%- else -%}"
        "{{- '" + THINK + "' -}}"
        "{%- endif -%}"
        "{%- endif -%}"
    )
