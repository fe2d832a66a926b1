"""Sampling and KV-cache decoding on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from darkhorse.config import ModelConfig
from darkhorse.errors import DarkhorseError
from darkhorse.infer.generate import generate_tokens, sample_next, stream_text
from darkhorse.model import Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=100, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    model = Transformer(config)
    with torch.no_grad():  # sharper logits so greedy choices are not near-ties
        model.embed.weight.mul_(8)
    return model.eval()


def greedy_without_cache(model: Transformer, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1, :100]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def test_greedy_with_cache_matches_full_recompute(model):
    prompt = [5, 17, 42, 8]
    cached = list(generate_tokens(model, prompt, max_new_tokens=12, vocab_size=100))
    assert cached == greedy_without_cache(model, prompt, 12)


def test_greedy_is_deterministic_and_top_k_one_is_greedy(model):
    prompt = [1, 2, 3]
    first = list(generate_tokens(model, prompt, max_new_tokens=10, vocab_size=100))
    assert first == list(generate_tokens(model, prompt, max_new_tokens=10, vocab_size=100))
    sampled = list(generate_tokens(model, prompt, max_new_tokens=10, temperature=1.0, top_k=1, seed=3, vocab_size=100))
    assert sampled == first


def test_sampling_is_reproducible_with_seed(model):
    options = dict(max_new_tokens=20, temperature=1.5, top_p=0.9, seed=7, vocab_size=100)
    assert list(generate_tokens(model, [4, 4], **options)) == list(generate_tokens(model, [4, 4], **options))


def test_stops_at_stop_id_and_respects_vocab_limit(model):
    ids = list(generate_tokens(model, [9], max_new_tokens=30, temperature=2.0, seed=1, vocab_size=10, stop_ids=[3]))
    assert all(i < 10 for i in ids)
    assert 3 not in ids[:-1]


def test_context_limits(model):
    assert len(list(generate_tokens(model, list(range(60)), max_new_tokens=50, vocab_size=100))) == 4
    with pytest.raises(DarkhorseError):
        list(generate_tokens(model, list(range(64)), max_new_tokens=1))
    with pytest.raises(DarkhorseError):
        list(generate_tokens(model, [], max_new_tokens=1))


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([2.0, 1.9, -1.0])
    seen = torch.tensor([0])
    assert sample_next(logits, seen, temperature=0, top_k=0, top_p=1, repetition_penalty=1.0, generator=None) == 0
    assert sample_next(logits, seen, temperature=0, top_k=0, top_p=1, repetition_penalty=1.5, generator=None) == 1


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([10.0, 9.0, -10.0, -10.0])
    generator = torch.Generator().manual_seed(0)
    picks = {
        sample_next(
            logits,
            torch.tensor([], dtype=torch.long),
            temperature=1.0,
            top_k=0,
            top_p=0.5,
            repetition_penalty=1.0,
            generator=generator,
        )
        for _ in range(50)
    }
    assert picks == {0}


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
