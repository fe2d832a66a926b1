"""The decode engine on a tiny random model: KV-cache decoding, sampling, ragged batches, streaming."""

from __future__ import annotations

import pytest
import torch

from darkhorse.config import ModelConfig
from darkhorse.errors import DarkhorseError
from darkhorse.infer.engine import Engine, sample_next
from darkhorse.infer.generate import stream_text
from darkhorse.model import Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=100, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    model = Transformer(config)
    with torch.no_grad():  # sharper logits so greedy choices are not near-ties
        model.embed.weight.mul_(8)
    return model.eval()


def stream(model: Transformer, prompt: list[int], vocab_size: int | None = None, **options) -> list[int]:
    return list(Engine(model, vocab_size).stream(prompt, **options))


def greedy_without_cache(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1, :100]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_greedy_with_cache_matches_full_recompute(model):
    prompt = [5, 17, 42, 8]
    cached = stream(model, prompt, max_new_tokens=12, vocab_size=100)
    assert cached == greedy_without_cache(model, prompt, 12)


def test_greedy_is_deterministic_and_top_k_one_is_greedy(model):
    prompt = [1, 2, 3]
    first = stream(model, prompt, max_new_tokens=10, vocab_size=100)
    assert first == stream(model, prompt, max_new_tokens=10, vocab_size=100)
    sampled = stream(model, prompt, max_new_tokens=10, temperature=1.0, top_k=1, seed=3, vocab_size=100)
    assert sampled == first


def test_sampling_is_reproducible_with_seed(model):
    options = dict(max_new_tokens=20, temperature=1.5, top_p=0.9, seed=7, vocab_size=100)
    assert stream(model, [4, 4], **options) == stream(model, [4, 4], **options)


def test_stops_at_stop_id_and_respects_vocab_limit(model):
    ids = stream(model, [9], max_new_tokens=30, temperature=2.0, seed=1, vocab_size=10, stop_ids=[3])
    assert all(i < 10 for i in ids)
    assert 3 not in ids[:-1]


def test_context_limits(model):
    assert len(stream(model, list(range(60)), max_new_tokens=50, vocab_size=100)) == 4
    with pytest.raises(DarkhorseError):
        stream(model, list(range(64)), max_new_tokens=1)
    with pytest.raises(DarkhorseError):
        stream(model, [], max_new_tokens=1)


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([[2.0, 1.9, -1.0], [2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False], [False, False, False]])  # row 0 has written token 0
    options = dict(temperature=0, top_k=0, top_p=1, generator=None)
    assert sample_next(logits, seen, repetition_penalty=1.0, **options).tolist() == [0, 0]
    assert sample_next(logits, seen, repetition_penalty=1.5, **options).tolist() == [1, 0]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[10.0, 9.0, -10.0, -10.0]]).expand(50, -1)
    generator = torch.Generator().manual_seed(0)
    seen = torch.zeros(50, 4, dtype=torch.bool)
    options = dict(temperature=1.0, top_k=0, top_p=0.5, repetition_penalty=1.0, generator=generator)
    assert set(sample_next(logits, seen, **options).tolist()) == {0}


RAGGED = [[5, 17, 42, 8, 9, 30], [1, 2], [60, 2, 2, 2], [7]]


def test_ragged_batch_decodes_each_row_as_alone(model):
    """Rows of different lengths, decoded together, write exactly the tokens each writes alone."""
    engine = Engine(model, 100)
    batched = engine.generate(RAGGED, max_new_tokens=12)
    assert batched == [engine.generate([prompt], max_new_tokens=12)[0] for prompt in RAGGED]
    assert batched == [greedy_without_cache(model, prompt, 12) for prompt in RAGGED]


def test_stream_is_the_batch_of_one(model):
    engine = Engine(model, 100)
    options = dict(max_new_tokens=15, temperature=0.9, top_k=20, repetition_penalty=1.2, seed=5)
    assert list(engine.stream([3, 1, 4], **options)) == engine.generate([[3, 1, 4]], **options)[0]


def test_each_row_stops_at_its_own_stop_id(model):
    engine = Engine(model, 100)
    free = engine.generate(RAGGED, max_new_tokens=12)
    stop = free[0][3]  # a token the first row writes: rows that write it end there, the others go on
    cut = engine.generate(RAGGED, max_new_tokens=12, stop_ids=[stop])
    for row, full in zip(cut, free, strict=True):
        assert row == (full[: full.index(stop) + 1] if stop in full else full)
    assert cut == [engine.generate([prompt], max_new_tokens=12, stop_ids=[stop])[0] for prompt in RAGGED]


def test_rows_stop_at_the_context_end_on_their_own(model):
    lengths = [len(row) for row in Engine(model, 100).generate([list(range(60)), [1, 2]], max_new_tokens=50)]
    assert lengths == [4, 50]


def test_seeded_batch_sampling_is_reproducible(model):
    engine = Engine(model, 100)
    options = dict(max_new_tokens=20, temperature=1.5, top_p=0.9, seed=7)
    first = engine.generate(RAGGED, **options)
    assert first == engine.generate(RAGGED, **options)
    assert first != engine.generate(RAGGED, **(options | {"seed": 8}))


def test_decode_restores_the_training_mode(model):
    model.train()
    try:
        Engine(model, 100).generate([[1, 2, 3]], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


class ByteCodec:
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")


def test_stream_text_holds_back_partial_characters():
    ids = list("héllo €".encode())
    pieces = list(stream_text(ByteCodec(), ids))
    assert "".join(pieces) == "héllo €"
    assert all("\ufffd" not in piece for piece in pieces)


class CountingCodec(ByteCodec):
    """Records the longest id list it was asked to decode."""

    def __init__(self) -> None:
        self.longest = 0

    def decode(self, ids: list[int]) -> str:
        self.longest = max(self.longest, len(ids))
        return super().decode(ids)


def test_stream_text_decodes_a_bounded_window_per_id():
    text = "ab€ ünï " * 300  # 1-, 2- and 3-byte characters, 3,000 ids
    codec = CountingCodec()
    assert "".join(stream_text(codec, list(text.encode()))) == text
    assert codec.longest <= 6  # the last piece and the newest ids, never the whole reply
