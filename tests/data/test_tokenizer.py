"""Tokenizer: fixed special ids, digit-by-digit numbers, exact round trips, transformers compatibility."""

from __future__ import annotations

import hashlib

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from darkhorse.data.chat_format import render_conversation
from darkhorse.data.tokenizer import (
    MIN_VOCAB_SIZE,
    PRE_TOKENIZER_REGEX,
    SPECIAL_TOKENS,
    Tokenizer,
)
from darkhorse.errors import DarkhorseError

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and 1234 + 5678 = 6912.\n\n",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 30))  # 42\n",
    "Ünïcödé text, 日本語のテキスト, emoji 🙂🚀 and tabs\tand  double  spaces.",
    render_conversation(
        [{"role": "user", "content": "What is 17 + 25?"}, {"role": "assistant", "content": "42"}],
        reasoning="7 + 5 = 12, carry 1; 1 + 2 + 1 = 4.",
    ),
] * 30


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=500)


def test_special_tokens_have_fixed_ids_zero_to_eleven(tokenizer):
    assert list(tokenizer.special_tokens) == list(SPECIAL_TOKENS)
    assert list(tokenizer.special_tokens.values()) == list(range(12))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.token_to_id("<|think|>") == 9


def test_vocab_size_honours_the_request(tokenizer):
    assert MIN_VOCAB_SIZE < tokenizer.vocab_size <= 500


def test_training_learns_no_merges_from_special_token_strings(tokenizer):
    learned = [token for token in tokenizer.backend.get_vocab() if "<|" in token or "|>" in token]
    assert sorted(learned) == sorted(SPECIAL_TOKENS)


def test_numbers_are_split_into_single_digits(tokenizer):
    # "1234" appears 30 times in the corpus; a digit-grouping pre-tokenizer would merge it.
    ids = tokenizer.encode("1234 + 5678")
    pieces = [tokenizer.decode([i]) for i in ids]
    assert "".join(pieces) == "1234 + 5678"
    assert [p for p in pieces if p.strip().isdigit()] == list("12345678")


def test_pre_tokenizer_matches_the_regex_llama_cpp_implements(tokenizer):
    text = "It's 2024: I'LL say 'hi'\r\n\n  x=1234;\tfoo  bar 日本 🙂!!"
    expected = regex.findall(PRE_TOKENIZER_REGEX, text)
    pieces = [
        tokenizer.backend.decoder.decode([piece]) for piece, _ in tokenizer.backend.pre_tokenizer.pre_tokenize_str(text)
    ]
    assert pieces == expected


def test_special_token_strings_in_text_encode_as_specials_and_nothing_is_added(tokenizer):
    ids = tokenizer.encode("<|user|>hi<|/user|>")
    assert ids[0] == tokenizer.token_to_id("<|user|>")
    assert ids[-1] == tokenizer.token_to_id("<|/user|>")
    assert tokenizer.encode("hi") == ids[1:-1]
    assert tokenizer.encode("") == []


def test_encode_batch_equals_encode(tokenizer):
    texts = CORPUS[:4] + ["", "x"]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]


TRICKY = st.lists(
    st.sampled_from([*SPECIAL_TOKENS, "<|", "|>", "<|bos", " ", "  ", "\n", "\r\n", "\t", "1", "23", "é", "🙂", "a"])
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), TRICKY))
def test_encode_decode_round_trips_any_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_save_and_load_keep_ids_and_hash(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(path)
    assert loaded.sha256 == tokenizer.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.encode(CORPUS[3]) == tokenizer.encode(CORPUS[3])
    assert loaded.path == path


def test_transformers_loads_the_file_with_the_same_ids(tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    path = tokenizer.save(tmp_path / "tokenizer.json")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in CORPUS[:4]:
        assert hf(text)["input_ids"] == tokenizer.encode(text)
        assert hf.decode(tokenizer.encode(text)) == text


def test_vocab_smaller_than_specials_plus_bytes_is_an_error():
    with pytest.raises(DarkhorseError, match="--vocab-size must be at least 268"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_bad_tokenizer_files_are_one_line_errors(tmp_path):
    with pytest.raises(DarkhorseError, match="tokenizer file not found"):
        Tokenizer.from_file(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DarkhorseError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(broken)
    foreign = tmp_path / "foreign.json"
    BackendTokenizer(models.BPE()).save(str(foreign))
    loaded = Tokenizer.from_file(foreign)  # a foreign tokenizer still loads for plain text ...
    assert loaded.special_tokens == {}
    with pytest.raises(DarkhorseError, match=r"foreign\.json: lacks the darkhorse special tokens <\|bos\|>"):
        loaded.require_special_tokens()  # ... but not for chat
    with pytest.raises(DarkhorseError, match=r"foreign\.json: no end-of-sequence token found"):
        _ = loaded.eos_id  # ... nor, without any end token, for documents
