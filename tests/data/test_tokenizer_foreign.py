"""Foreign tokenizers (an imported model's): bos/eos/pad resolved from the files beside them or common
names, their chat template kept, and `prepare` framing plain text with their own tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

from darkhorse.data.prepare import prepare
from darkhorse.data.tokenizer import BOS, Tokenizer
from darkhorse.errors import DarkhorseError


def test_declared_settings_win_over_common_names(tmp_path, foreign_tokenizer):
    tok = Tokenizer.from_file(foreign_tokenizer(tmp_path / "declared"))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>")
    assert tok.bos_id == 0 and tok.eos_id == 4 and not tok.has_chat_tokens and "{{ bos_token }}" in tok.chat_template

    bare = Tokenizer.from_file(foreign_tokenizer(tmp_path / "bare", settings=False))
    assert (bare.bos_token, bare.eos_token, bare.chat_template) == ("<|begin_of_text|>", "<|end_of_text|>", None)


def test_checkpoint_import_record_and_chat_template_file_are_read(tmp_path, foreign_tokenizer):
    folder = tmp_path / "ckpt"
    foreign_tokenizer(folder, settings=False)
    record = {"import": {"tokenizer": {"eos_token": "<|eot_id|>", "bos_token": None}}}
    (folder / "meta.json").write_text(json.dumps(record))
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    assert tok.eos_token == "<|eot_id|>" and tok.chat_template == "{{ messages[0]['content'] }}"


def test_a_tokenizer_without_any_end_token_is_a_one_line_error(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    Backend(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.bos_id is None
    with pytest.raises(DarkhorseError, match=r"tokenizer\.json: no end-of-sequence token found .* declare eos_token"):
        _ = tok.eos_id


def test_prepare_frames_plain_text_with_the_foreign_tokens_and_keeps_its_settings(tmp_path, foreign_tokenizer):
    tokenizer_file = foreign_tokenizer(tmp_path / "hf")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"one two three {i}"}) + "\n" for i in range(40)))
    data = prepare([corpus], tmp_path / "prepared", tokenizer=tokenizer_file, val_fraction=0.1, progress=False)
    tok = Tokenizer.from_file(tmp_path / "prepared" / "tokenizer.json")
    assert tok.sha256 == Tokenizer.from_file(tokenizer_file).sha256 == data.tokenizer_sha256
    assert tok.eos_token == "<|eot_id|>" and tok.chat_template  # settings travelled with the tokenizer
    tokens = np.fromfile(tmp_path / "prepared" / "train.bin", dtype="<u4")
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    assert (tokens == tok.bos_id).sum() == (tokens == tok.eos_id).sum() > 30
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert (meta["bos_id"], meta["eos_id"]) == (0, 4)


def test_prepare_refuses_chat_records_for_a_tokenizer_without_darkhorse_chat_tokens(tmp_path, foreign_tokenizer):
    tokenizer_file = foreign_tokenizer(tmp_path / "hf")
    corpus = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    corpus.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(DarkhorseError, match=rf"lacks the darkhorse special tokens {BOS.replace('|', '.')}.*"
                                             "which chat records need"):  # fmt: skip
        prepare([corpus], tmp_path / "prepared", tokenizer=tokenizer_file, progress=False)
    assert not (tmp_path / "prepared").exists()
