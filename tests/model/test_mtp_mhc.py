"""MTP changes the loss only through its weight; mHC mixes streams with doubly-stochastic matrices."""

from __future__ import annotations

import torch

from darkhorse.config import load_run_config
from darkhorse.model import Transformer
from darkhorse.model.mhc import HyperConnection, sinkhorn_knopp


def tiny(*overrides: str):
    base = [
        "model.vocab_size=128",
        "model.dim=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.n_kv_heads=2",
        "model.ffn_dim=64",
        "model.max_seq_len=32",
        "train.seq_len=16",
        "model.attention=mla",
        "model.mla.kv_lora_rank=16",
        "model.mla.qk_nope_head_dim=8",
        "model.mla.qk_rope_head_dim=4",
        "model.mla.v_head_dim=8",
        "model.ffn=moe",
        "model.moe.n_routed_experts=4",
        "model.moe.moe_intermediate_size=16",
        "model.moe.first_k_dense=1",
    ]
    return load_run_config(overrides=[*base, *overrides]).model


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128, (2, 17), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def main_grads(model: Transformer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("mtp.") and p.grad is not None}


def test_mtp_changes_the_loss_only_through_its_weight():
    torch.manual_seed(0)
    with_mtp = Transformer(tiny("model.mtp_depth=2"))
    without = Transformer(tiny("model.mtp_depth=0"))
    without.load_state_dict({k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")})
    tokens, targets = batch()

    out = with_mtp(tokens, targets, mtp_weight=0.0)
    out.loss.backward()
    reference = without(tokens, targets)
    reference.loss.backward()
    assert torch.equal(out.loss, reference.loss) and torch.equal(out.losses["lm"], reference.loss)
    assert out.losses["mtp"] > 0
    expected = main_grads(without)
    for name, grad in main_grads(with_mtp).items():
        torch.testing.assert_close(grad, expected[name], atol=0, rtol=0, msg=name)

    weighted = with_mtp(tokens, targets, mtp_weight=0.5)
    torch.testing.assert_close(weighted.loss, weighted.losses["lm"] + 0.5 * weighted.losses["mtp"])


def test_mtp_modules_are_saved_and_skipped_at_inference():
    model = Transformer(tiny("model.mtp_depth=1")).eval()
    assert any(k.startswith("mtp.0.eh_proj") for k in model.state_dict())
    calls = []
    model.mtp[0].register_forward_hook(lambda *args: calls.append(1))
    tokens, targets = batch()
    with torch.no_grad():
        model(tokens)
        cache = model.new_cache(2, 32)
        model(tokens, cache=cache, start_pos=0)
        assert calls == []
        model(tokens, targets)
    assert calls == [1]
    assert model.num_active_params(include_mtp=True) > model.num_active_params()


def test_sinkhorn_gives_doubly_stochastic_matrices():
    logits = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(0))
    matrix = sinkhorn_knopp(logits, iters=20)
    assert (matrix >= 0).all()
    torch.testing.assert_close(matrix.sum(-1), torch.ones(5, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(matrix.sum(-2), torch.ones(5, 4), atol=1e-5, rtol=0)
    product = matrix[0] @ matrix[1]  # the set is closed under products: depth cannot blow the residual up
    torch.testing.assert_close(product.sum(-1), torch.ones(4), atol=1e-5, rtol=0)
    assert torch.linalg.matrix_norm(matrix, ord=2).max() <= 1 + 1e-5


def test_mhc_starts_as_plain_residual_and_trains():
    config = tiny("model.residual=mhc", "model.mhc.expansion=4")
    connection = HyperConnection(config)
    streams = torch.randn(2, 3, 4, 32)
    pre, post, res = connection.coefficients(streams)
    torch.testing.assert_close(pre, torch.full_like(pre, 0.25), atol=0.02, rtol=0)
    torch.testing.assert_close(post, torch.ones_like(post), atol=0.02, rtol=0)
    assert (res.diagonal(dim1=-2, dim2=-1) > 0.9).all()

    torch.manual_seed(0)
    model = Transformer(config)
    tokens, targets = batch()
    out = model(tokens, targets, mtp_weight=0.0)
    out.loss.backward()
    for name in ("layers.0.attn_hc.proj", "layers.1.ffn_hc.scale", "layers.1.ffn_hc.bias", "embed.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert torch.isfinite(out.loss)
