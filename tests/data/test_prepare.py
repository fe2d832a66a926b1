"""prepare(): the prepared directory matches its inputs, splits never overlap, failures leave nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from darkhorse.data.chat_format import render_conversation, render_prompt
from darkhorse.data.prepare import is_validation, prepare, prepare_cached
from darkhorse.data.prepared import sha256_file
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.errors import DarkhorseError

CHAT = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}]


@pytest.fixture
def corpus(tmp_path):
    """Three files, three formats: domain-tagged JSONL, chat JSONL, paragraphs of text."""
    tagged = tmp_path / "tagged.jsonl"
    tagged.write_text(
        "".join(
            json.dumps({"domain": ("math", "code")[i % 2], "text": f"item {i}: {i} * 3 = {3 * i}"}) + "\n"
            for i in range(120)
        )
    )
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": CHAT, "reasoning": "3 plus 4"}) + "\n")
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(f"Paragraph {i} of the book." for i in range(40)))
    return [tagged, chat, book]


def _documents(data, tokenizer: Tokenizer, split: str) -> list[str]:
    """Decode a split back into documents (each is framed <|bos|>...<|eos|>)."""
    text = tokenizer.decode(data.tokens(split).tolist())
    return [doc.removesuffix("<|eos|>") for doc in text.split("<|bos|>")[1:]]


def test_prepared_directory_holds_every_document_once(corpus, tmp_path):
    data = prepare(corpus, tmp_path / "out", vocab_size=400, val_fraction=0.2, progress=False)
    tokenizer = Tokenizer.from_file(data.tokenizer_path)
    train, val = _documents(data, tokenizer, "train"), _documents(data, tokenizer, "val")
    expected = [json.loads(line)["text"] for line in corpus[0].read_text().splitlines()]
    expected.append(render_conversation(CHAT, reasoning="3 plus 4").removeprefix("<|bos|>").removesuffix("<|eos|>"))
    expected += [f"Paragraph {i} of the book." for i in range(40)]
    assert sorted(train + val) == sorted(expected)
    assert not set(train) & set(val) and val
    assert all(is_validation(doc.encode(), 0.2) for doc in val if not doc.startswith("<|"))

    meta = data.meta
    assert meta["domains"] == ["math", "code", "general"]
    assert meta["vocab_size"] == tokenizer.vocab_size and meta["tokenizer_sha256"] == tokenizer.sha256
    assert meta["special_tokens"]["<|bos|>"] == meta["bos_id"] == 0
    assert [entry["sha256"] for entry in meta["inputs"]] == [sha256_file(path) for path in corpus]
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["documents"] == len(_documents(data, tokenizer, split))
        assert info["tokens"] == len(data.tokens(split))
        assert sum(d["tokens"] for d in info["domains"].values()) == info["tokens"]
        counts = np.bincount(data.domains(split), minlength=3)
        for name, numbers in info["domains"].items():
            assert counts[meta["domains"].index(name)] == numbers["tokens"]


def test_domain_ids_follow_each_token(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"domain": "a", "text": "aaa"}\n{"domain": "b", "text": "bb bb"}\n')
    data = prepare([path], tmp_path / "out", vocab_size=300, val_fraction=0.0, progress=False)
    tokenizer = Tokenizer.from_file(data.tokenizer_path)
    tokens, domains = data.tokens("train"), data.domains("train")
    first_length = len(tokenizer.encode("<|bos|>aaa<|eos|>"))
    assert domains[:first_length].tolist() == [0] * first_length
    assert set(domains[first_length:].tolist()) == {1} and len(tokens) == len(domains)


def test_loss_mask_covers_the_replies_of_chat_records_and_all_of_plain_text(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        json.dumps({"messages": CHAT, "reasoning": "3 plus 4"}) + "\n"
        + json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n"
        + json.dumps({"domain": "math", "text": "<|user|>looks like chat, but is text"}) + "\n"
    )  # fmt: skip
    book = tmp_path / "book.txt"
    book.write_text("One paragraph.\n\nAnother one.")
    data = prepare([chat, book], tmp_path / "out", vocab_size=300, val_fraction=0.0, progress=False)
    tokenizer = Tokenizer.from_file(data.tokenizer_path)
    tokens, mask = data.tokens("train"), data.loss_mask("train")
    assert mask is not None and len(mask) == len(tokens) and data.meta["loss_mask"] is True
    trained = [tokenizer.decode(tokens[start:end]) for start, end in _runs(mask)]
    assert trained == [
        "3 plus 4<|/think|><|assistant|>7<|/assistant|><|eos|>",
        "hi<|/assistant|><|eos|>"  # text records follow, wholly trained on, so the run goes on
        "<|bos|><|user|>looks like chat, but is text<|eos|><|bos|>One paragraph.<|eos|><|bos|>Another one.<|eos|>",
    ]
    prompt_length = len(tokenizer.encode(render_prompt(CHAT[:1])))
    assert mask[:prompt_length].sum() == 0 and mask[prompt_length] == 1
    assert data.meta["splits"]["train"]["loss_tokens"] == int(mask.sum())


def _runs(mask) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive 1s."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]]).astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def test_output_does_not_depend_on_chunk_size(corpus, tmp_path):
    tokenizer = Tokenizer.train(["item paragraph book"] * 10, vocab_size=300)
    big = prepare(corpus, tmp_path / "big", tokenizer=tokenizer, progress=False)
    small = prepare(corpus, tmp_path / "small", tokenizer=tokenizer, chunk_bytes=64, progress=False)
    for name in ("train.bin", "val.bin", "train.domains.bin", "val.domains.bin", "train.mask.bin", "tokenizer.json"):
        assert (big.path / name).read_bytes() == (small.path / name).read_bytes()


def test_given_tokenizer_is_reused(corpus, tmp_path):
    first = prepare(corpus, tmp_path / "first", vocab_size=300, progress=False)
    second = prepare(corpus[:1], tmp_path / "second", tokenizer=first.tokenizer_path, progress=False)
    assert second.tokenizer_sha256 == first.tokenizer_sha256
    assert second.meta["settings"]["trained_tokenizer"] is False


def test_chat_records_need_a_tokenizer_with_the_darkhorse_specials(corpus, tmp_path):
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models

    foreign = tmp_path / "foreign.json"
    BackendTokenizer(models.BPE()).save(str(foreign))
    with pytest.raises(DarkhorseError, match="lacks the darkhorse special tokens"):
        prepare(corpus, tmp_path / "out", tokenizer=foreign, progress=False)


def test_existing_output_needs_force(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(DarkhorseError, match="already exists; pass --force"):
        prepare(corpus, out, progress=False)
    assert (out / "precious.txt").read_text() == "mine"
    # --force replaces a prepared dir only: this one holds a user's file, which must survive
    with pytest.raises(DarkhorseError, match="not one"):
        prepare(corpus, out, force=True, progress=False)
    assert (out / "precious.txt").read_text() == "mine"
    (out / "precious.txt").unlink()
    prepare(corpus, out, vocab_size=300, force=True, progress=False)  # an empty dir may be filled
    first = (out / "train.bin").read_bytes()
    prepare(corpus, out, vocab_size=300, force=True, progress=False)  # a prepared dir is replaced
    assert (out / "train.bin").read_bytes() == first and (out / "meta.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_output_holding_an_input_is_refused_even_with_force(corpus, tmp_path):
    with pytest.raises(DarkhorseError, match="contains the input"):
        prepare(corpus, tmp_path, force=True, progress=False)


@pytest.mark.parametrize("train_tokenizer", [True, False], ids=["while-training-bpe", "while-encoding"])
def test_a_failure_midway_leaves_no_directory(corpus, tmp_path, train_tokenizer):
    bad = tmp_path / "late.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    tokenizer = None if train_tokenizer else Tokenizer.train(["fine"], vocab_size=300)
    with pytest.raises(DarkhorseError, match=r"late\.jsonl:2: malformed JSON"):
        prepare([*corpus, bad], tmp_path / "out", tokenizer=tokenizer, vocab_size=300, chunk_bytes=64, progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_skip_bad_records_are_counted_in_meta(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"text": "good one"}\nnot json\n{"nothing": 1}\n{"text": "good two"}\n')
    data = prepare([path], tmp_path / "out", vocab_size=300, skip_bad=True, val_fraction=0.0, progress=False)
    assert data.meta["splits"]["train"]["documents"] == 2
    [skipped] = data.meta["skipped"]
    assert skipped["count"] == 2 and skipped["examples"][0].startswith(f"{path}:2: malformed JSON")


def test_empty_corpus_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(DarkhorseError, match="empty corpus: no documents in .*empty.txt"):
        prepare([empty], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_settings_are_errors(corpus, tmp_path):
    with pytest.raises(DarkhorseError, match="--val-fraction must be in"):
        prepare(corpus, tmp_path / "out", val_fraction=1.0, progress=False)
    with pytest.raises(DarkhorseError, match="txt split must be one of"):
        prepare(corpus, tmp_path / "out", txt_split="lines", progress=False)
    with pytest.raises(DarkhorseError, match="input file not found"):
        prepare([tmp_path / "missing.jsonl"], tmp_path / "out", progress=False)


def test_prepare_cached_reuses_and_rebuilds_on_change(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKHORSE_CACHE", str(tmp_path / "cache"))
    raw = tmp_path / "train.jsonl"
    raw.write_text("".join(json.dumps({"text": f"sample number {i}"}) + "\n" for i in range(50)))
    first = prepare_cached(raw, vocab_size=300, progress=False)
    assert first.parent == tmp_path / "cache" / "prepared" and (first / "meta.json").exists()
    stamp = (first / "train.bin").stat().st_mtime_ns
    assert prepare_cached(raw, vocab_size=300, progress=False) == first
    assert (first / "train.bin").stat().st_mtime_ns == stamp
    assert prepare_cached(raw, vocab_size=320, progress=False) != first
    raw.write_text(raw.read_text() + json.dumps({"text": "one more"}) + "\n")
    changed = prepare_cached(raw, vocab_size=300, progress=False)
    assert changed != first and json.loads((changed / "meta.json").read_text())["splits"]["train"]["documents"] > 0


def test_prepare_cached_rebuilds_a_damaged_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKHORSE_CACHE", str(tmp_path / "cache"))
    raw = tmp_path / "train.txt"
    raw.write_text("\n\n".join(f"paragraph {i}" for i in range(30)))
    cached = prepare_cached(raw, vocab_size=300, progress=False)
    (cached / "train.bin").write_bytes(b"\x00\x01")
    assert prepare_cached(raw, vocab_size=300, progress=False) == cached
    assert (cached / "train.bin").stat().st_size % 4 == 0
