"""Batches: deterministic from (seed, step, micro-step), mixed in exact proportions, with domains."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from darkhorse.data.loader import WindowLoader, open_sources, parse_data_spec, source_of_window
from darkhorse.errors import DarkhorseError
from darkhorse.model.transformer import IGNORE_INDEX


def loader_for(sources, **overrides):
    options = {"seq_len": 16, "batch_size": 4, "grad_accum": 2, "seed": 7} | overrides
    return WindowLoader(sources, **options)


def test_batches_are_a_function_of_seed_and_step(make_prepared, tmp_path):
    sources = open_sources([(make_prepared(tmp_path / "d", period=97), 1.0)], vocab_size=64)
    first, again = loader_for(sources), loader_for(sources)
    a = first.batch(5, 1)
    first.batch(0, 0)  # no hidden iterator state: other batches in between change nothing
    b = again.batch(5, 1)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert torch.equal(a.inputs[:, 1:], a.targets[:, :-1])  # targets are inputs shifted by one
    assert not torch.equal(a.inputs, first.batch(5, 0).inputs)
    assert not torch.equal(a.inputs, loader_for(sources, seed=8).batch(5, 1).inputs)
    assert a.inputs.dtype == torch.int64 and a.inputs.shape == (4, 16)
    assert a.domains is None


def test_mixture_takes_windows_in_exactly_the_given_proportions(make_prepared, tmp_path):
    sources = open_sources(
        [(make_prepared(tmp_path / name, seed=i), weight) for i, (name, weight) in enumerate([("a", 3), ("b", 1)])],
        vocab_size=64,
    )
    loader = loader_for(sources)
    counts = Counter(source for step in range(25) for micro in range(2) for source in loader.batch(step, micro).sources)
    assert counts == {0: 150, 1: 50}  # 200 windows, 3:1
    three = [5.0, 3.0, 2.0]
    assert Counter(source_of_window(i, three) for i in range(1000)) == {0: 500, 1: 300, 2: 200}
    for n in range(1, 200):  # and never more than one window off along the way
        counts = Counter(source_of_window(i, three) for i in range(n))
        assert all(abs(counts[k] - n * w / 10) < 1 for k, w in enumerate(three))


def test_source_steps_read_the_sources_in_order_and_the_first_phase_as_alone(make_prepared, tmp_path):
    sources = open_sources(
        [(make_prepared(tmp_path / name, seed=i), 1.0) for i, name in enumerate(("a", "b", "c"))], vocab_size=64
    )
    loader = loader_for(sources, source_steps=3)
    assert [set(loader.batch(step, 1).sources) for step in range(8)] == [{0}] * 3 + [{1}] * 3 + [{2}] * 2
    alone = loader_for(sources[:1])
    for step in range(3):  # the first phase's batches are exactly those of a run on the first source
        assert torch.equal(loader.batch(step, 1).inputs, alone.batch(step, 1).inputs)
    assert not torch.equal(loader.batch(3, 1).inputs, alone.batch(3, 1).inputs)
    assert len({batch.sources[0] for batch in loader.val_batches(6)}) == 3  # validation still mixes


def test_domains_travel_with_their_tokens_and_val_batches_are_fixed(make_prepared, tmp_path):
    sources = open_sources([(make_prepared(tmp_path / "d", domains=True, period=97), 1.0)], vocab_size=64)
    loader = loader_for(sources)
    batch = loader.batch(0, 0)
    assert batch.domains is not None and batch.domains.dtype == torch.uint8
    assert batch.domains.shape == batch.inputs.shape
    val = loader.val_batches(3)
    assert len(val) == 3
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(val, loader.val_batches(3), strict=True))


def test_domain_ids_follow_the_first_sources_names(make_prepared, tmp_path):
    """Each prepared dir numbers its domains as it met them; a batch speaks the first source's numbers."""
    first, second = (make_prepared(tmp_path / name, domains=True, seed=i) for i, name in enumerate("ab"))
    meta = json.loads((second / "meta.json").read_text())
    (second / "meta.json").write_text(json.dumps(meta | {"domains": ["c", "a", "d"]}))  # ids 0, 1, 2
    loader = loader_for(open_sources([(first, 1.0), (second, 1.0)], vocab_size=64), source_steps=1)
    assert set(loader.batch(0, 0).domains.unique().tolist()) == {0, 1, 2}  # a, b, c
    assert set(loader.batch(1, 0).domains.unique().tolist()) == {2, 0, 3}  # c, a and d after the first's


def test_masked_targets_are_ignored_and_the_inputs_keep_the_prompt(make_prepared, tmp_path):
    masked = open_sources([(make_prepared(tmp_path / "m", loss_mask=True), 1.0)], vocab_size=64)
    plain = open_sources([(make_prepared(tmp_path / "p"), 1.0)], vocab_size=64)
    mask = masked[0][0].loss_mask("train")
    tokens = masked[0][0].tokens("train")
    for batch in (loader_for(masked).batch(3, 1), *loader_for(masked).val_batches(2)):
        ignored = batch.targets == IGNORE_INDEX
        assert 0 < ignored.float().mean() < 1
        assert torch.equal(batch.inputs[:, 1:][~ignored[:, :-1]], batch.targets[:, :-1][~ignored[:, :-1]])
    batch = loader_for(masked).batch(3, 1)
    for row in range(batch.inputs.shape[0]):  # find the window's start, then compare with the mask file
        start = next(s for s in range(len(tokens) - 16) if tokens[s : s + 16].tolist() == batch.inputs[row].tolist())
        assert torch.equal(batch.targets[row] == IGNORE_INDEX, torch.from_numpy(mask[start + 1 : start + 17] == 0))
    unmasked = loader_for(masked, loss_mask=False).batch(3, 1)
    assert torch.equal(unmasked.inputs, batch.inputs) and not (unmasked.targets == IGNORE_INDEX).any()
    assert not (loader_for(plain).batch(3, 1).targets == IGNORE_INDEX).any()  # no mask file: every token counts


def test_data_specs_and_source_errors(make_prepared, tmp_path):
    assert parse_data_spec("web/:3") == (Path("web/"), 3.0)
    assert parse_data_spec("data/prepared") == (Path("data/prepared"), 1.0)
    assert parse_data_spec("C:/x:0.5") == (Path("C:/x"), 0.5)
    with pytest.raises(DarkhorseError, match="positive"):
        parse_data_spec("web:0")
    with pytest.raises(DarkhorseError, match="not found"):
        open_sources([(tmp_path / "nope", 1.0)], vocab_size=64)
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(DarkhorseError, match="notes.md"):
        open_sources([(tmp_path / "notes.md", 1.0)], vocab_size=64)
    short = open_sources([(make_prepared(tmp_path / "short", train_tokens=10), 1.0)], vocab_size=64)
    with pytest.raises(DarkhorseError, match="train.seq_len"):
        loader_for(short)


def test_several_raw_files_share_the_first_ones_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("DARKHORSE_CACHE", str(tmp_path / "cache"))
    for name, word in (("a.txt", "alpha"), ("b.txt", "beta")):
        (tmp_path / name).write_text("\n\n".join(f"{word} document number {i} of many" for i in range(200)))
    sources = open_sources([(tmp_path / "a.txt", 1.0), (tmp_path / "b.txt", 1.0)], vocab_size=300)
    assert sources[0][0].tokenizer_sha256 == sources[1][0].tokenizer_sha256


def test_batch_and_sequence_warmups_cut_the_full_shape_windows(make_prepared, tmp_path):
    sources = open_sources([(make_prepared(tmp_path / "d", period=97), 1.0)], vocab_size=64)
    full = loader_for(sources, seq_len=64)
    growing = loader_for(sources, seq_len=64, batch_warmup_steps=4, seq_warmup_steps=8)
    assert [growing.shape(step) for step in (0, 1, 3, 4, 7, 8)] == [
        (1, 16),
        (2, 16),
        (4, 32),
        (4, 48),
        (4, 64),
        (4, 64),
    ]
    assert growing.tokens_per_step(0) == 1 * 16 * 2 and growing.tokens_per_step(9) == full.tokens_per_step(9)
    for step, micro in ((0, 1), (2, 0), (9, 1)):  # the first rows and tokens of what the full shape reads
        cut, whole = growing.batch(step, micro), full.batch(step, micro)
        rows, seq = growing.shape(step)
        assert torch.equal(cut.inputs, whole.inputs[:rows, :seq]) and torch.equal(
            cut.targets, whole.targets[:rows, :seq]
        )


def test_aligned_windows_start_at_the_document_their_random_start_falls_in(make_prepared, tmp_path):
    """train.align_windows: a chat reply is never learned from a window that cut its prompt off."""
    import json

    import numpy as np

    path = make_prepared(tmp_path / "docs")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4096), ("val", 1024)):  # documents of 3-12 tokens, each opening with BOS = 0
        docs = [np.r_[0, rng.integers(1, 64, size=rng.integers(2, 12))] for _ in range(count // 3)]
        np.concatenate(docs)[:count].astype("<u4").tofile(path / f"{split}.bin")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(meta | {"bos_id": 0}))
    sources = open_sources([(path, 1.0)], vocab_size=64)
    tokens, starts = sources[0][0].tokens("train"), sources[0][0].document_starts("train")
    assert starts.tolist() == np.flatnonzero(tokens == 0).tolist()
    for step in range(4):
        plain, aligned = loader_for(sources).batch(step, 0), loader_for(sources, align=True).batch(step, 0)
        assert (aligned.inputs[:, 0] == 0).all()
        for row in range(plain.inputs.shape[0]):  # the same random start, moved back to its document's BOS
            start = next(s for s in range(len(tokens)) if tokens[s : s + 16].tolist() == plain.inputs[row].tolist())
            begin = int(starts[starts <= start].max())
            assert aligned.inputs[row].tolist() == tokens[begin : begin + 16].tolist()
    assert not (loader_for(sources).batch(0, 0).inputs[:, 0] == 0).all()  # random starts land mid-document
    assert (loader_for(sources, align=True).val_batches(1)[0].inputs[:, 0] == 0).all()
