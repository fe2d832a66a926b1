"""Chat with a foreign tokenizer: prompts rendered by its own chat template exactly as transformers
renders them, replies ended by its end-of-turn token, and a clear error without any template."""

from __future__ import annotations

import pytest

from darkhorse.data.tokenizer import Tokenizer
from darkhorse.errors import DarkhorseError
from darkhorse.infer.prompting import chat_stop_ids, render_chat_prompt, render_template, split_reply

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " one two? "}]


def test_foreign_template_renders_as_transformers_does(tmp_path, foreign_tokenizer):
    transformers = pytest.importorskip("transformers")
    tokenizer_file = foreign_tokenizer(tmp_path)
    ours = render_chat_prompt(Tokenizer.from_file(tokenizer_file), MESSAGES)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs
    assert ours.startswith("<|begin_of_text|><|start_header_id|>system")
    assert ours.endswith("assistant<|end_header_id|>\n\n")


def test_think_switch_and_helpers_reach_the_template():
    template = (
        "{% if not enable_thinking %}/no_think {% endif %}{{ messages | map(attribute='content') | list | tojson }}"
        "{% if messages | length > 5 %}{{ raise_exception('too long') }}{% endif %}"
    )
    assert render_template(template, MESSAGES, enable_thinking=False) == '/no_think ["be brief", " one two? "]'
    with pytest.raises(DarkhorseError, match="the chat template refused the conversation: too long"):
        render_template(template, MESSAGES * 3, enable_thinking=True)


def test_foreign_replies_stop_at_end_of_turn_and_split_reasoning(tmp_path, foreign_tokenizer):
    tok = Tokenizer.from_file(foreign_tokenizer(tmp_path))
    assert chat_stop_ids(tok) == {tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")}
    assert split_reply(tok, "<think>\nadd them\n</think>\n\nthree") == ("add them", "three")
    assert split_reply(tok, " three ") == (None, "three")


def test_chat_without_our_tokens_or_a_template_is_a_one_line_error(tmp_path, foreign_tokenizer):
    tok = Tokenizer.from_file(foreign_tokenizer(tmp_path, settings=False))
    with pytest.raises(DarkhorseError, match=r"tokenizer\.json: this tokenizer has neither darkhorse's chat tokens "
                                             r"nor a chat template of its own"):  # fmt: skip
        render_chat_prompt(tok, MESSAGES)
