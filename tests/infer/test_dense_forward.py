"""The engine's dense GQA step (DenseForward) against `Transformer.forward`, and when it stands aside."""

from __future__ import annotations

import pytest
import torch

from darkhorse.config import ModelConfig
from darkhorse.finetune.lora import LoRASpec, apply_lora
from darkhorse.infer.dense_forward import DenseForward, ModelForward, forward_step
from darkhorse.infer.engine import Engine
from darkhorse.model import Transformer

CONFIG = dict(vocab_size=100, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**(CONFIG | overrides)))
    with torch.no_grad():  # sharper logits so greedy choices are not near-ties
        model.embed.weight.mul_(8)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones, so folding the norm weights is exercised
                param.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("n_kv_heads", [2, 4, 1])
def test_dense_step_computes_the_model_forward(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    assert DenseForward.supports(model)
    tokens = torch.randint(0, 100, (3, 12))
    fast, slow = DenseForward(model, 3, 12, 100), ModelForward(model, 3, 12, 100)
    with torch.inference_mode():
        steps = [(tokens[:, :5], 0), (tokens[:, 5:8], 5), *((tokens[:, p : p + 1], p) for p in range(8, 12))]
        for feed, start in steps:  # a prefill, a multi-token step behind the cache, one-token steps
            logits = fast(feed, start)
            torch.testing.assert_close(logits, slow(feed, start), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, model(tokens).logits[:, -1, :100], rtol=1e-5, atol=1e-5)  # no cache


def test_models_it_does_not_restate_go_through_their_forward():
    assert isinstance(forward_step(make_model(), 2, 8, 100), DenseForward)
    recipe = (dict(ffn_activation="relu2"), dict(positions="learned"), dict(logit_softcap=15.0))  # issue 17
    for overrides in (dict(qk_norm=True), dict(attention_bias=True), dict(ffn="moe"), *recipe):
        assert isinstance(forward_step(make_model(**overrides), 2, 8, 100), ModelForward), overrides
    assert isinstance(forward_step(make_model().to(torch.bfloat16), 2, 8, 100), ModelForward)
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
