"""Bits per byte with exact byte accounting: bytes per token (special tokens 0), hand-computed figures on a
model of known output, lm-eval's rolling windows against a brute-force computation, masks and domains,
raw files against prepared dirs, and the trainer's val bpb on masked chat data."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from darkhorse.data.chat_format import render_conversation
from darkhorse.data.prepare import prepare
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.errors import DarkhorseError
from darkhorse.eval.perplexity import document_spans, score_text, score_tokens, token_byte_lengths
from darkhorse.model import Transformer

TEXT = "Ünïcödé café, naïve — 😀 and plain words 12345.\n\ttabs"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([TEXT, "plain words and more words"] * 10, vocab_size=300)


def test_token_bytes_add_up_to_the_text_and_specials_weigh_nothing(tokenizer, foreign_tokenizer, tmp_path):
    foreign = Tokenizer.from_file(foreign_tokenizer(tmp_path / "foreign"))
    for tok in (tokenizer, foreign):
        lengths = token_byte_lengths(tok)
        assert len(lengths) == tok.vocab_size
        ids = tok.encode(TEXT)
        assert int(lengths[ids].sum()) == len(TEXT.encode("utf-8"))  # partial UTF-8 pieces included
        assert int(lengths[tok.eos_id]) == 0 and int(lengths[tok.bos_id]) == 0
    assert all(int(token_byte_lengths(tokenizer)[i]) == 0 for i in tokenizer.special_tokens.values())


class UniformModel(nn.Module):
    """Equal logits over `vocab` ids: every target costs exactly ln(vocab) nats."""

    def __init__(self, vocab: int, context: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(1, 1)
        self.config = SimpleNamespace(max_seq_len=context)
        self.vocab = vocab

    def forward(self, tokens):
        return SimpleNamespace(logits=torch.zeros(*tokens.shape, self.vocab))


def test_bits_per_byte_by_hand(tokenizer):
    lengths = token_byte_lengths(tokenizer)
    a, b = tokenizer.encode("plain")[0], tokenizer.encode(" words")[0]
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    stream = np.array([bos, a, b, eos, bos, b, eos])
    model = UniformModel(vocab=320)
    score = score_tokens(model, stream, lengths, bos_id=bos, eos_id=eos)
    nats = math.log(320)
    # targets: a, b, eos, b, eos (bos only starts documents); eos carries 0 bytes, so its nats leave bpb
    assert score.overall.tokens == 5 and score.overall.documents == 2
    assert score.overall.loss == pytest.approx(nats)
    text_bytes = int(lengths[a]) + 2 * int(lengths[b])
    assert score.overall.bytes == text_bytes == len(b"plain") + 2 * len(b" words")
    assert score.overall.bits_per_byte == pytest.approx(3 * nats / math.log(2) / text_bytes)
    # a loss mask keeps only the marked targets (here: the second document's)
    masked = score_tokens(model, stream, lengths, bos_id=bos, eos_id=eos, mask=np.array([0, 0, 0, 0, 0, 1, 1]))
    assert masked.overall.tokens == 2 and masked.overall.bytes == int(lengths[b])
    assert masked.overall.bits_per_byte == pytest.approx(nats / math.log(2) / int(lengths[b]))
    # per domain: each target counts for its own token's domain
    domains = np.array([0, 0, 0, 0, 1, 1, 1])
    split = score_tokens(model, stream, lengths, bos_id=bos, eos_id=eos, domains=domains, domain_names=["x", "y"])
    assert split.by_domain["x"].bytes == int(lengths[a] + lengths[b]) and split.by_domain["y"].tokens == 2


def test_documents_split_at_bos_or_after_eos():
    assert document_spans(np.array([0, 5, 6, 1, 0, 7, 1]), 0, 1) == (0, [(1, 4), (5, 7)])
    assert document_spans(np.array([5, 6, 1, 7, 1]), None, 1) == (1, [(0, 3), (3, 5)])


def _brute_force_nats(model, ids: list[int], skip: int) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits.float(), -1)[0]
    return -float(logp.gather(1, torch.tensor(ids[1:])[:, None])[skip:].sum())


def test_rolling_windows_are_lm_evals(tokenizer):
    """A document of 11 tokens + eos in windows of 4: runs of 4, 4 (one token of context each), then 3
    with a full window of context, then the eos alone with a full window; lengths of 3 fit one window."""
    from darkhorse.config import ModelConfig

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                    max_seq_len=16)).eval()  # fmt: skip
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    text = list(range(20, 31))
    full = [bos, *text, eos]
    stream = np.array([*full, bos, 40, 41, eos])
    lengths = torch.ones(320, dtype=torch.int64)
    lengths[eos] = 0
    score = score_tokens(model, stream, lengths, bos_id=bos, eos_id=eos, window=4, batch_tokens=8)
    expected = (
        _brute_force_nats(model, full[0:5], 0)  # bos t0 t1 t2 -> t0..t3
        + _brute_force_nats(model, full[4:9], 0)  # t3 -> t4..t7
        + _brute_force_nats(model, full[7:12], 1)  # last run t8..t10, context filled to the window
        + _brute_force_nats(model, full[-5:], 3)  # eos after a full window
        + _brute_force_nats(model, [bos, 40, 41, eos], 0)
    )
    assert score.overall.tokens == 12 + 3
    assert score.overall.nats == pytest.approx(expected, rel=1e-5)


def test_raw_file_equals_its_prepared_dir_and_chat_gets_bpb(tmp_path, tokenizer):
    from darkhorse.config import ModelConfig

    records = [{"domain": "talk", "messages": [{"role": "user", "content": "plain words?"},
                                              {"role": "assistant", "content": f"words {i} and more"}]}
               for i in range(6)] + [{"domain": "prose", "text": TEXT}] * 2  # fmt: skip
    rich = Tokenizer.train([TEXT, render_conversation(records[0]["messages"])] * 10, vocab_size=300)
    raw = tmp_path / "mixed.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=rich.vocab_size, n_layers=1, dim=32, n_heads=2, n_kv_heads=1,
                                    ffn_dim=64, max_seq_len=64)).eval()  # fmt: skip
    from_file = score_text(model, rich, raw)
    prepared = prepare([raw], tmp_path / "prepared", tokenizer=rich, val_fraction=0.0, progress=False)
    from_dir = score_text(model, rich, prepared.path, split="train")
    assert from_file.overall.bits_per_byte == pytest.approx(from_dir.overall.bits_per_byte, rel=1e-9)
    assert from_file.masked and set(from_file.by_domain) == {"talk", "prose"}
    assert from_file.by_domain["talk"].bits_per_byte is not None  # masked chat data has a figure
    every = score_text(model, rich, raw, all_tokens=True)
    assert not every.masked and every.overall.tokens > from_file.overall.tokens
    assert every.by_domain["prose"].bytes == 2 * len(TEXT.encode()) == from_file.by_domain["prose"].bytes


def test_bad_text_inputs_are_one_line_errors(tmp_path, tokenizer):
    model = UniformModel(vocab=320)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"first line\n" + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(DarkhorseError, match=r"latin1.txt:2: not UTF-8"):
        score_text(model, tokenizer, bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DarkhorseError, match="empty corpus"):
        score_text(model, tokenizer, empty)
    with pytest.raises(DarkhorseError, match="no such file"):
        score_text(model, tokenizer, tmp_path / "missing.txt")
    other = Tokenizer.train(["something else entirely"] * 5, vocab_size=280)
    good = tmp_path / "ok.txt"
    good.write_text("plain words\n\nmore words\n")
    prepared = prepare([good], tmp_path / "p", tokenizer=other, val_fraction=0.0, progress=False)
    with pytest.raises(DarkhorseError, match="another tokenizer"):
        score_text(model, tokenizer, prepared.path, split="train")
    with pytest.raises(DarkhorseError, match="window"):
        score_tokens(model, np.array([1, 2]), token_byte_lengths(tokenizer), bos_id=None, eos_id=1, window=999)


def test_trainer_val_bpb_counts_bytes_per_target_on_masked_chat(tmp_path):
    """The trainer's val bits per byte is exact for chat data trained on the replies only."""
    from darkhorse.config import load_run_config
    from darkhorse.train.trainer import train

    records = [{"messages": [{"role": "user", "content": f"say {i} words"},
                             {"role": "assistant", "content": " ".join(["words"] * (i % 5 + 1))}]}
               for i in range(400)]  # fmt: skip
    raw = tmp_path / "chat.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    prepared = prepare([raw], tmp_path / "prepared", vocab_size=300, val_fraction=0.2, progress=False)
    assert prepared.loss_mask("val") is not None and not prepared.loss_mask("val").all()
    config = load_run_config("tiny-cpu", overrides=[
        "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4", "train.max_steps=2", "train.eval_steps=2",
        "train.eval_interval=2", "train.save_interval=0", "train.warmup_steps=1",
        f"model.vocab_size={prepared.vocab_size}",
    ])  # fmt: skip
    result = train(config, [(prepared.path, 1.0)], tmp_path / "run", verbose=False)
    assert result.val_bpb is not None and 0 < result.val_bpb < 20  # before: None whenever a mask existed
