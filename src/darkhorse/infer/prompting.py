"""Prompt rendering for chat and eval: the one place that knows how a conversation becomes a model's
prompt and which tokens end its reply. darkhorse's chat format (data/chat_format.py) when the tokenizer
has its tokens, else the chat template an imported model's tokenizer brought along
(tokenizer_config.json), rendered with Jinja2 the way transformers' `apply_chat_template` renders it."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from darkhorse.data.chat_format import REASONING_KEYS, Part, parse_reply, prompt_parts, render_prompt
from darkhorse.data.tokenizer import ASSISTANT, ASSISTANT_END, THINK, THINK_END, Tokenizer
from darkhorse.errors import DarkhorseError

# Tokens that end an assistant turn in other models' chat formats (Llama 3, ChatML/Qwen, Phi, Gemma, ...).
END_OF_TURN_TOKENS = (
    "<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>",
)  # fmt: skip
FOREIGN_THINK, FOREIGN_THINK_END = "<think>", "</think>"  # Qwen3 / DeepSeek-R1 reasoning markers


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise DarkhorseError(f"the chat template refused the conversation: {message}")


def render_template(template: str, messages: Sequence[dict], **variables: Any) -> str:
    """Render a HF chat template in a sandbox with the helpers templates expect from transformers."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DarkhorseError("a model's own chat template needs jinja2: pip install 'darkhorse[interop]'") from None
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return environment.from_string(template).render(messages=list(messages), **variables)
    except TemplateError as exc:
        raise DarkhorseError(f"the tokenizer's chat template failed: {exc}") from None


def render_chat_prompt(tokenizer: Tokenizer, messages: Sequence[dict], think: bool = True) -> str:
    """The text a model continues to write the next assistant turn, in the format it was trained on."""
    if tokenizer.has_chat_tokens:
        return render_prompt(messages, think=think)
    if not tokenizer.chat_template:
        raise DarkhorseError(
            f"{tokenizer.path}: this tokenizer has neither darkhorse's chat tokens nor a chat template of its own "
            "(no chat_template in tokenizer_config.json); use `darkhorse generate` for plain text"
        )
    return render_template(
        tokenizer.chat_template,
        messages,
        add_generation_prompt=True,
        enable_thinking=think,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token,
    )


def encode_chat_prompt(tokenizer: Tokenizer, messages: Sequence[dict], think: bool = True) -> tuple[str, list[int]]:
    """(text, ids) of `render_chat_prompt`, the messages' text encoded as plain text: whatever a user types,
    `<|/user|>` or `<|im_end|>` included, stays characters and cannot forge a turn of the chat format."""
    if tokenizer.has_chat_tokens:
        parts = prompt_parts(messages, think=think)
    else:
        parts = _template_parts(tokenizer, messages, think)
    return "".join(text for text, _ in parts), tokenizer.encode_parts(parts)


_STAND_IN = re.compile("\ue000(\\d+)\ue001")  # private-use characters no template or text produces


def _template_parts(tokenizer: Tokenizer, messages: Sequence[dict], think: bool) -> list[Part]:
    """A foreign chat template's prompt as parts: rendered with a stand-in for each message text, which is
    then put back as a plain-text part. A template that edits message text (the two renderings differ) is
    used as it renders, when no message holds a special-token string; otherwise refused."""
    texts: list[str] = []

    def stand_in(value: str) -> str:
        texts.append(value)
        return f"\ue000{len(texts) - 1}\ue001"

    keys = ("content", *REASONING_KEYS)
    marked = [{k: stand_in(v) if k in keys and isinstance(v, str) and v else v for k, v in m.items()} for m in messages]
    pieces = _STAND_IN.split(render_chat_prompt(tokenizer, marked, think=think))
    parts = [(texts[int(piece)], False) if k % 2 else (piece, True) for k, piece in enumerate(pieces)]
    rendered = render_chat_prompt(tokenizer, messages, think=think)
    if "".join(text for text, _ in parts) == rendered:
        return [(text, is_markup) for text, is_markup in parts if text]
    specials = [t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special]
    if any(token in text for text in texts for token in specials):
        raise DarkhorseError(
            f"{tokenizer.path}: its chat template edits message text, so a message holding a special token "
            "string cannot be encoded safely; remove the <|...|> markup from the message"
        )
    return [(rendered, True)]


def chat_stop_ids(tokenizer: Tokenizer) -> set[int]:
    """Ids that end a chat reply: eos and the end-of-turn token of the tokenizer's chat format."""
    names = (ASSISTANT_END,) if tokenizer.has_chat_tokens else END_OF_TURN_TOKENS
    ids = {tokenizer.token_to_id(name) for name in names} | {tokenizer.eos_id}
    return {token_id for token_id in ids if token_id is not None}


def split_reply(tokenizer: Tokenizer, completion: str, *, opened_think: bool = False) -> tuple[str | None, str]:
    """(reasoning, answer) of a generated reply (without its stop token), by the markers of the tokenizer's
    chat format. `opened_think`: the prompt ended inside darkhorse's think block (`render_prompt(think=True)`);
    parsing the reply with that opening keeps an unclosed think block from passing for an answer."""
    if tokenizer.has_chat_tokens:
        return parse_reply(THINK + completion if opened_think else completion)
    if FOREIGN_THINK_END in completion:
        reasoning, answer = completion.split(FOREIGN_THINK_END, 1)
        return reasoning.replace(FOREIGN_THINK, "").strip(), answer.strip()
    return None, completion.strip()


def think_marker_ids(tokenizer: Tokenizer) -> tuple[set[int], set[int]]:
    """(ids that open reasoning, ids that end it) in the tokenizer's chat format, for splitting a reply as it
    streams: darkhorse's <|think|> and <|/think|> (<|assistant|> also starts the answer), or a foreign
    tokenizer's <think> and </think> when it has them as tokens."""
    if tokenizer.has_chat_tokens:
        opening, closing = (THINK,), (THINK_END, ASSISTANT)
    else:
        opening, closing = (FOREIGN_THINK,), (FOREIGN_THINK_END,)
    ids = tokenizer.token_to_id
    return {ids(t) for t in opening if ids(t) is not None}, {ids(t) for t in closing if ids(t) is not None}


def prompt_opens_think(prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside a think block (darkhorse's `render_prompt(think=True)`,
    or a template that opens <think> for the model, as DeepSeek-R1's does)."""
    return prompt.rstrip().endswith((THINK, FOREIGN_THINK))
