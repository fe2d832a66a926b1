"""Fine-tuning data in the base model's own chat format.

A base with darkhorse's chat tokens gets darkhorse's chat format (`data.chat_format`); an imported
base gets its tokenizer's own Jinja chat template (Llama 3's for a Llama-3 base), rendered as
transformers' `apply_chat_template` renders it (`infer.prompting.render_template`). The loss counts
the assistant's turns only: each turn's characters are found by rendering the conversation up to the
turn's prompt (with the generation prompt) and up to its end, and `data.prepare` masks the tokens
that overlap them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from darkhorse.data.loader import parse_data_spec
from darkhorse.data.prepare import prepare_cached
from darkhorse.data.prepared import open_prepared
from darkhorse.data.readers import ChatRenderer
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.errors import DarkhorseError
from darkhorse.infer.prompting import render_template


def template_renderer(tokenizer: Tokenizer) -> ChatRenderer:
    """A `ChatRenderer` for the tokenizer's own chat template."""
    template = tokenizer.chat_template
    variables = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token}

    def render(messages: Sequence[Mapping[str, Any]], reasoning: str | None) -> tuple[str, list[tuple[int, int]]]:
        messages = [dict(m) for m in messages]
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not turns:
            raise DarkhorseError("the conversation has no assistant turn: nothing to learn")
        if reasoning and messages[-1].get("role") == "assistant":
            messages[-1]["reasoning_content"] = reasoning
        full = render_template(template, messages, add_generation_prompt=False, **variables)
        spans = []
        for i in turns:
            prompt = render_template(template, messages[:i], add_generation_prompt=True, **variables)
            upto = render_template(template, messages[: i + 1], add_generation_prompt=False, **variables)
            if not (upto.startswith(prompt) and full.startswith(upto)):
                raise DarkhorseError(
                    f"the chat template does not render assistant turn {i} as a continuation of its prompt, "
                    "so the assistant's tokens cannot be found"
                )
            spans.append((len(prompt), len(upto)))
        return full, spans

    return render


def prepare_for_base(
    specs: list[str], tokenizer: Tokenizer, *, progress: bool = True, skip_bad: bool = False
) -> list[tuple[Path, float]]:
    """--data PATH[:WEIGHT] items as prepared dirs in the base's tokenizer and chat format.

    Raw files are prepared (and cached) with the base's tokenizer and template, skipping malformed or
    unrenderable records with `skip_bad`; prepared dirs are used as they are (the trainer checks their
    tokenizer). Data with nothing to learn is refused."""
    renderer = key = None
    if not tokenizer.has_chat_tokens and tokenizer.chat_template:
        renderer = template_renderer(tokenizer)
        key = hashlib.sha256(
            "\0".join([tokenizer.chat_template, tokenizer.bos_token or "", tokenizer.eos_token]).encode()
        ).hexdigest()
    data = []
    for spec in specs:
        path, weight = parse_data_spec(spec)
        if path.is_file():
            path = prepare_cached(
                path,
                tokenizer=tokenizer,
                progress=progress,
                chat_renderer=renderer,
                renderer_key=key or "",
                skip_bad=skip_bad,
            )
        prepared = open_prepared(path)
        train = prepared.split_info("train")
        if train.get("loss_tokens", train.get("tokens", 0)) == 0:
            raise DarkhorseError(f"--data {spec}: no assistant turns (no token to learn from)")
        data.append((path, weight))
    return data
