"""The CPU training step's own paths (issue 17: a cheaper genesis-demo step) compute the reference math:
each one against the plain torch composite it replaces, forward and gradients, and the whole MLA + MoE
model's loss and every gradient against the model run with those references patched back in."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from darkhorse.config import load_run_config
from darkhorse.model import Transformer, attention, layers
from darkhorse.model.kernels import IGNORE_INDEX


def reference_rms_norm(self, x):
    return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight.float()).to(x.dtype)


def reference_attention(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def reference_mla_rope(self, q_rope, k_rope, cos, sin):
    return layers.apply_rope_pair(attention.deinterleave(q_rope), attention.deinterleave(k_rope), cos, sin)


def grads_of(output, inputs, grad):
    return torch.autograd.grad(output, inputs, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_composite_forward_and_gradients(dtype):
    torch.manual_seed(0)
    norm = layers.RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.add_(torch.randn(24))
    x = (3 * torch.randn(2, 5, 24)).to(dtype).requires_grad_()
    grad = torch.randn(2, 5, 24).to(dtype)
    ours = norm(x)
    theirs = reference_rms_norm(norm, x)
    assert ours.dtype == dtype
    # fp32: bit for bit (trained checkpoints must not move); bf16: the same up to the casts' rounding
    tolerance = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(ours, theirs, **tolerance)
    for a, b in zip(grads_of(ours, (x, norm.weight), grad), grads_of(theirs, (x, norm.weight), grad), strict=True):
        torch.testing.assert_close(a, b, **tolerance)


def test_mla_shaped_attention_on_cpu_matches_sdpa_and_is_taken():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 9, 12, requires_grad=True), torch.randn(2, 3, 9, 12, requires_grad=True)
    v = torch.randn(2, 3, 9, 8, requires_grad=True)  # q/k head dim 12, v head dim 8, as MLA's
    grad = torch.randn(2, 3, 9, 8)
    assert attention._sdpa_takes_its_math_path(q, v, gqa=False)
    ours, theirs = attention.causal_attention(q, k, v, scale=0.3), reference_attention(q, k, v, 0.3)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(grads_of(ours, (q, k, v), grad), grads_of(theirs, (q, k, v), grad), strict=True):
        torch.testing.assert_close(a, b)
    assert not attention._sdpa_takes_its_math_path(q, torch.randn(2, 3, 9, 12), gqa=False)  # flash takes it


def test_rotating_pairs_in_place_gives_the_de_interleaved_rotation_and_its_scores(monkeypatch):
    torch.manual_seed(0)
    cos, sin = layers.rope_tables(10, 16, 10000.0, load_run_config("genesis-tiny").model.rope_scaling)
    cos, sin = cos[:7], sin[:7]
    q = torch.randn(2, 7, 3, 16).transpose(1, 2)[..., 6:].requires_grad_()  # a rope slice, as MLA's
    k = torch.randn(2, 1, 7, 10, requires_grad=True)
    ours = layers.rotate_pairs(q, cos, sin), layers.rotate_pairs(k, cos, sin)
    theirs = reference_mla_rope(None, q, k, cos, sin)
    torch.testing.assert_close(attention.deinterleave(ours[0]), theirs[0])
    torch.testing.assert_close(ours[1] @ ours[0].transpose(-1, -2), theirs[1] @ theirs[0].transpose(-1, -2))
    grad = torch.randn(2, 3, 7, 10)
    ours_grad = grads_of(ours[0], q, grad)[0]
    torch.testing.assert_close(ours_grad, grads_of(theirs[0], q, attention.deinterleave(grad))[0])
    half_tables = layers.rotate_pairs(q, cos.bfloat16(), sin.bfloat16())  # a model cast to bf16 casts them
    torch.testing.assert_close(half_tables, ours[0], rtol=1e-2, atol=2e-2)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the real-valued form compiled graphs take
    torch.testing.assert_close(layers.rotate_pairs(q, cos, sin), ours[0])


def test_genesis_loss_and_gradients_match_the_reference_paths(monkeypatch):
    """MLA + MoE + a loss mask (the head skips the masked rows): loss and every gradient as before."""
    config = load_run_config("genesis-tiny", overrides=["model.n_layers=2"]).model
    torch.manual_seed(0)
    model = Transformer(config).train()
    tokens = torch.randint(0, config.vocab_size, (3, 32))
    targets = tokens.roll(-1, 1)
    targets[:, :12] = IGNORE_INDEX  # a prompt
    targets[1, 20:] = IGNORE_INDEX

    def loss_and_grads(return_logits):
        model.zero_grad(set_to_none=True)
        out = model(tokens, targets, mtp_weight=0.3, return_logits=return_logits)
        out.loss.backward()
        return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    ours, ours_grads = loss_and_grads(return_logits=False)
    monkeypatch.setattr(layers.RMSNorm, "forward", reference_rms_norm)
    monkeypatch.setattr(attention, "_masked_softmax_attention", reference_attention)
    monkeypatch.setattr(attention.MultiHeadLatentAttention, "_rope", reference_mla_rope)
    theirs, theirs_grads = loss_and_grads(return_logits=True)  # the whole logits: every row, plain cross-entropy
    torch.testing.assert_close(ours, theirs)
    assert ours_grads.keys() == theirs_grads.keys()
    for name, grad in theirs_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
