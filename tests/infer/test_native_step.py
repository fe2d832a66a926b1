"""The native batch-1 decode step (NativeStep) against `Transformer.forward`, and the eager fallback."""

from __future__ import annotations

import shutil

import pytest
import torch

from darkhorse.config import ModelConfig
from darkhorse.infer import native_step
from darkhorse.infer.dense_forward import DenseForward, ModelForward, forward_step
from darkhorse.infer.engine import Engine
from darkhorse.infer.native_step import NativeStep
from darkhorse.model import Transformer

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler: the eager step decodes")

# dims that are not multiples of the vector width or of the 4-row blocks, so the loops' tails run
CONFIG = dict(vocab_size=99, n_layers=2, dim=72, n_heads=4, n_kv_heads=2, ffn_dim=100, max_seq_len=64)


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**(CONFIG | overrides)))
    with torch.no_grad():  # sharper logits so greedy choices are not near-ties, norm weights not all ones
        model.embed.weight.mul_(8)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("n_kv_heads", [2, 4, 1])
def test_native_step_computes_the_model_forward(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    tokens = torch.randint(0, 99, (1, 40))
    fast, slow = forward_step(model, 1, 40, 99), ModelForward(model, 1, 40, 99)
    assert isinstance(fast, NativeStep)
    with torch.inference_mode():
        steps = [(tokens[:, :5], 0), (tokens[:, 5:8], 5), *((tokens[:, p : p + 1], p) for p in range(8, 40))]
        for feed, start in steps:  # a prefill, a multi-token step behind the cache, one-token steps
            logits = fast(feed, start)
            torch.testing.assert_close(logits, slow(feed, start), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, model(tokens).logits[:, -1, :99], rtol=1e-5, atol=1e-5)  # no cache
        with pytest.raises(ValueError):
            fast(
                torch.tensor([[model.embed.weight.shape[0]]]), 0
            )  # outside the embedding: refused, not read out of bounds
        with pytest.raises(ValueError):
            fast(tokens[:, :1], 40)  # past the cache


def test_threads_split_rows_without_changing_a_sum():
    """Each thread computes whole rows of a product, so 2 threads give the very same logits as 1."""
    model, tokens = make_model(), torch.randint(0, 99, (1, 20))
    threads = torch.get_num_threads()
    logits = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            step = forward_step(model, 1, 20, 99)
            step(tokens[:, :19], 0)
            logits.append(step(tokens[:, 19:], 19).clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*logits)


def test_greedy_tokens_equal_the_eager_step(monkeypatch):
    model, prompt = make_model(), [5, 17, 42, 8]
    native = Engine(model, 99).generate([prompt], max_new_tokens=40)[0]
    monkeypatch.setattr(NativeStep, "supports", staticmethod(lambda model, batch: False))
    assert isinstance(forward_step(model, 1, 8, 99), DenseForward)
    assert native == Engine(model, 99).generate([prompt], max_new_tokens=40)[0]


def test_the_eager_step_decodes_where_the_native_one_cannot(monkeypatch, tmp_path):
    model = make_model()
    assert isinstance(forward_step(model, 2, 8, 99), DenseForward)  # more than one row
    assert isinstance(forward_step(model.to(torch.bfloat16), 1, 8, 99), ModelForward)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="did not build"):
        assert native_step.build(tmp_path) is None
    monkeypatch.setattr(native_step, "library", lambda: None)
    assert isinstance(forward_step(make_model(), 1, 8, 99), DenseForward)


def test_the_library_is_built_once_into_the_cache_dir(tmp_path):
    assert native_step.build(tmp_path) is not None
    built = list(tmp_path.glob("native_step-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert native_step.build(tmp_path) is not None  # loaded, not rebuilt
    assert [p.stat().st_mtime_ns for p in tmp_path.glob("native_step-*.so")] == [stamp]
