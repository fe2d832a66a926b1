"""The engine's dense GQA steps (DenseForward, and NativeStep for one row) against `Transformer.forward`,
and when they stand aside."""

from __future__ import annotations

import shutil

import pytest
import torch

from darkhorse.config import ModelConfig
from darkhorse.finetune.lora import LoRASpec, apply_lora
from darkhorse.infer import native_step
from darkhorse.infer.dense_forward import DenseForward, ModelForward, forward_step
from darkhorse.infer.engine import Engine
from darkhorse.infer.native_step import NativeStep
from darkhorse.model import Transformer

CONFIG = dict(vocab_size=100, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
# sizes off the native step's vector width and 4-row blocks, so its loops' tails run too
ODD_SIZES = dict(vocab_size=99, dim=72, ffn_dim=100)
needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler: the eager step decodes")


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**(CONFIG | overrides)))
    with torch.no_grad():  # sharper logits so greedy choices are not near-ties
        model.embed.weight.mul_(8)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones, so folding the norm weights is exercised
                param.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize(
    "kind, batch, sizes",
    [
        (DenseForward, 3, {}),
        (DenseForward, 3, ODD_SIZES),
        (DenseForward, 3, dict(qk_norm=True, tie_embeddings=False)),  # tiny-cpu's architecture (issue 17)
        pytest.param(NativeStep, 1, ODD_SIZES, marks=needs_compiler),
        pytest.param(NativeStep, 1, dict(qk_norm=True, tie_embeddings=False), marks=needs_compiler),
    ],
)
@pytest.mark.parametrize("n_kv_heads", [2, 4, 1])
def test_dense_steps_compute_the_model_forward(kind, batch, sizes, n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads, **sizes)
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch, 12))
    fast, slow = forward_step(model, batch, 12, vocab), ModelForward(model, batch, 12, vocab)
    assert type(fast) is kind
    with torch.inference_mode():
        steps = [(tokens[:, :5], 0), (tokens[:, 5:8], 5), *((tokens[:, p : p + 1], p) for p in range(8, 12))]
        for feed, start in steps:  # a prefill, a multi-token step behind the cache, one-token steps
            logits = fast(feed, start)
            torch.testing.assert_close(logits, slow(feed, start), rtol=1e-5, atol=1e-5)
            if kind is NativeStep and start:  # the greedy id the C step returns with its logits
                assert fast.argmax == int(logits.argmax())
        torch.testing.assert_close(logits, model(tokens).logits[:, -1, :vocab], rtol=1e-5, atol=1e-5)  # no cache
        with pytest.raises(ValueError):
            fast(tokens[:, :1], 12)  # past the cache


def test_dense_step_with_per_row_positions_computes_the_model_forward():
    """The continuous batch's use: prompts prefilled each in its own cache row, then one-token steps at each
    row's own position (a tensor), a row moved into another's slot; logits equal `Transformer.forward`'s."""
    model = make_model()
    fast, slow = DenseForward(model, 3, 24, 100), ModelForward(model, 3, 24, 100)
    torch.manual_seed(1)
    histories = [torch.randint(0, 100, (1, n)) for n in (5, 2, 9)]

    def check(logits, rows):  # against a cache-free forward of each row's whole history
        expected = torch.cat([model(histories[r]).logits[:, -1, :100] for r in rows])
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    with torch.inference_mode():
        for row, prompt in enumerate(histories):
            logits = fast(prompt, 0, row=row, all_positions=True)
            torch.testing.assert_close(logits, model(prompt).logits[..., :100], rtol=1e-5, atol=1e-5)
            slow(prompt, 0, row=row)
        rows = [0, 1, 2]
        for step in range(5):
            if step == 3:  # row 0 leaves: the last row moves into its slot
                fast.move_row(2, 0)
                slow.move_row(2, 0)
                rows = [2, 1]
            feed = torch.randint(0, 100, (len(rows), 1))
            positions = torch.tensor([histories[r].shape[1] for r in rows])
            for i, r in enumerate(rows):
                histories[r] = torch.cat([histories[r], feed[i : i + 1]], dim=1)
            logits = fast(feed, positions)
            torch.testing.assert_close(logits, slow(feed, positions), rtol=1e-5, atol=1e-5)
            check(logits, rows)


def test_models_it_does_not_restate_go_through_their_forward():
    assert isinstance(forward_step(make_model(), 2, 8, 100), DenseForward)
    recipe = (dict(ffn_activation="relu2"), dict(positions="learned"), dict(logit_softcap=15.0), dict(value_embeds=1))
    for overrides in (dict(attention_bias=True), dict(ffn="moe"), *recipe):
        assert isinstance(forward_step(make_model(**overrides), 2, 8, 100), ModelForward), overrides
    for batch in (2, 1):  # the native step (one row) takes what DenseForward takes, no more
        assert isinstance(forward_step(make_model().to(torch.bfloat16), batch, 8, 100), ModelForward)
    hooked = make_model()
    hooked.layers[1].ffn.register_forward_hook(lambda *_: None)
    assert isinstance(forward_step(hooked, 2, 8, 100), ModelForward)
    adapted = make_model()
    apply_lora(adapted, LoRASpec(r=4).for_model(adapted))
    assert isinstance(forward_step(adapted, 2, 8, 100), ModelForward)


def test_lora_deltas_count_when_decoding():
    """A LoRA model decodes through its own forward, so a nonzero adapter changes what it writes."""
    base, adapted = make_model(), make_model()
    apply_lora(adapted, LoRASpec(r=4).for_model(adapted))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 5.0)
    prompts = [[5, 17, 42, 8], [1, 2]]
    expected = []
    for prompt in prompts:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(adapted(torch.tensor([ids])).logits[0, -1, :100].argmax()))
        expected.append(ids[len(prompt) :])
    assert Engine(adapted, 100).generate(prompts, max_new_tokens=8) == expected
    assert Engine(base, 100).generate(prompts, max_new_tokens=8) != expected


@needs_compiler
def test_the_native_step_refuses_an_id_outside_the_embedding():
    model = make_model()
    with pytest.raises(ValueError):  # refused, not read out of bounds
        NativeStep(model, 1, 8, 100)(torch.tensor([[model.embed.weight.shape[0]]]), 0)


@needs_compiler
def test_native_threads_split_rows_without_changing_a_sum():
    """Each thread computes whole rows of a product, so 2 threads give the very same logits as 1."""
    model, tokens = make_model(**ODD_SIZES), torch.randint(0, 99, (1, 20))
    threads = torch.get_num_threads()
    logits = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            step = NativeStep(model, 1, 20, 99)
            step(tokens[:, :19], 0)
            logits.append(step(tokens[:, 19:], 19).clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*logits)


@needs_compiler
def test_native_greedy_tokens_equal_the_eager_step(monkeypatch):
    model, prompt = make_model(), [5, 17, 42, 8]
    assert isinstance(forward_step(model, 1, 8, 100), NativeStep)
    native = Engine(model, 100).generate([prompt], max_new_tokens=40)[0]
    monkeypatch.setattr(native_step, "library", lambda: None)  # as without a compiler
    assert isinstance(forward_step(model, 1, 8, 100), DenseForward)
    assert native == Engine(model, 100).generate([prompt], max_new_tokens=40)[0]
    monkeypatch.undo()
    stop = native[5]  # the lone row's stop check (on Python ints) ends it at the first one written
    stopped = Engine(model, 100).generate([prompt], max_new_tokens=40, stop_ids={stop})
    assert stopped == [native[: native.index(stop) + 1]]


@needs_compiler
def test_the_native_greedy_id_is_the_first_maximum():
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: a tie over the whole head
    step = NativeStep(model, 1, 4, 100)
    step(torch.tensor([[5, 17]]), 0)
    assert step.argmax is None  # a prompt's prefill goes through the model's forward
    step(torch.tensor([[42]]), 2)
    assert step.argmax == 0


def test_a_failed_native_build_warns_and_gives_none(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(UserWarning, match="did not build"):
        assert native_step.build(tmp_path) is None


@needs_compiler
def test_the_native_library_is_built_once_into_the_cache_dir(monkeypatch, tmp_path):
    """...and without OpenMP where the compiler has none (one thread), here a g++ that refuses -fopenmp."""
    compiler = tmp_path / "cxx"
    compiler.write_text('#!/bin/sh\ncase "$*" in *-fopenmp*) exit 1;; esac\nexec g++ "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    cache = tmp_path / "cache"
    lib = native_step.build(cache)
    built = list(cache.glob("native_step-*.so"))
    assert lib is not None and len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert native_step.build(cache) is not None  # loaded, not rebuilt
    assert [p.stat().st_mtime_ns for p in cache.glob("native_step-*.so")] == [stamp]
    model, tokens = make_model(), torch.tensor([[5, 17, 42]])
    monkeypatch.setattr(native_step, "library", lambda: lib)
    step = NativeStep(model, 1, 3, 100)
    step(tokens[:, :2], 0)
    with torch.inference_mode():
        expected = model(tokens).logits[:, -1, :100]
    torch.testing.assert_close(step(tokens[:, 2:], 2), expected, rtol=1e-5, atol=1e-5)
