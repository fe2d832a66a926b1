"""The CUDA fast path's pure-torch parts: the chunked linear + cross-entropy equals the plain head's loss
(and its gradients), `train.kernels` resolves on CPU without liger, and liger's kernels match the torch
math on a GPU (skipped without CUDA and liger)."""

from __future__ import annotations

import pytest
import torch

from darkhorse.config import load_run_config
from darkhorse.errors import DarkhorseError
from darkhorse.model import Transformer
from darkhorse.model import kernels as fused
from darkhorse.model.kernels import IGNORE_INDEX, linear_cross_entropy, resolve_kernels


def plain_loss_sum(hidden, weight, targets, softcap):
    logits = hidden @ weight.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_chunked_linear_cross_entropy_equals_the_plain_loss_and_gradients(monkeypatch, softcap):
    monkeypatch.setattr(fused, "CHUNK_VALUES", 7 * 96)  # 7 tokens per chunk at vocab 96: 5 chunks, the last short
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(96, 16, requires_grad=True)
    targets = torch.randint(0, 96, (3, 11))
    targets[0, :4] = IGNORE_INDEX
    targets[2, 7] = IGNORE_INDEX
    ours = linear_cross_entropy(hidden, weight, targets, softcap)
    theirs = plain_loss_sum(hidden, weight, targets, softcap)
    assert torch.allclose(ours, theirs, rtol=1e-5)
    (2.5 * ours).backward()
    ours_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (2.5 * theirs).backward()
    for a, b in zip(ours_grads, (hidden.grad, weight.grad), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # no gradient work without grad, same loss
        assert torch.allclose(linear_cross_entropy(hidden, weight, targets, softcap), ours)


def test_fused_head_loss_equals_the_plain_forward_with_mtp_and_a_loss_mask():
    config = load_run_config("genesis-tiny", overrides=["model.n_layers=2", "model.logit_softcap=30"]).model
    torch.manual_seed(0)
    model = Transformer(config).train()
    tokens = torch.randint(0, config.vocab_size, (2, 24))
    targets = torch.randint(0, config.vocab_size, (2, 24))
    targets[0, :10] = IGNORE_INDEX  # a prompt the loss mask skips

    def loss_and_grads(return_logits):
        model.zero_grad(set_to_none=True)
        out = model(tokens, targets, mtp_weight=0.3, return_logits=return_logits)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return out, grads

    plain, plain_grads = loss_and_grads(True)
    ours, ours_grads = loss_and_grads(False)
    assert ours.logits is None and plain.logits is not None
    for name in ("lm", "mtp"):
        assert torch.allclose(ours.losses[name], plain.losses[name], rtol=1e-5), name
    assert torch.allclose(ours.loss, plain.loss, rtol=1e-5)
    assert ours_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(ours_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_fully_masked_batch_gives_zero_loss_not_nan():
    config = load_run_config("tiny-cpu", overrides=["model.n_layers=1"]).model
    model = Transformer(config)
    tokens = torch.randint(0, config.vocab_size, (1, 8))
    out = model(tokens, torch.full_like(tokens, IGNORE_INDEX), return_logits=False)
    assert out.loss.item() == 0.0


def test_kernels_resolve_to_torch_on_cpu_and_liger_there_is_a_one_line_error():
    train = load_run_config("tiny-cpu").train
    assert train.kernels == "auto" and train.compile == "auto"  # compile: on for CUDA only (the trainer decides)
    cpu = torch.device("cpu")
    assert resolve_kernels("auto", cpu) == "torch" and resolve_kernels("torch", cpu) == "torch"
    with pytest.raises(DarkhorseError, match="train.kernels=liger needs CUDA"):
        resolve_kernels("liger", cpu)


def cuda_bf16_step(model, tokens, targets, kernels, return_logits=False):
    fused.use_kernels(model, kernels)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(tokens, targets, mtp_weight=0.3, return_logits=return_logits)
    out.loss.backward()
    return out.loss.float(), {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}


def assert_close_steps(ours, reference, rtol, what):
    assert torch.allclose(ours[0], reference[0], rtol=rtol), what
    assert ours[1].keys() == reference[1].keys()
    for name, grad in reference[1].items():
        scale = grad.abs().max().clamp(min=1e-6)
        assert (ours[1][name] - grad).abs().max() / scale < 5e-2, (what, name)


def cuda_models():
    """genesis-tiny (MLA + MoE + MTP) and its GQA twin, soft-capped, with a masked prompt."""
    for attention in ("gqa", "mla"):
        config = load_run_config("genesis-tiny", overrides=["model.logit_softcap=30", f"model.attention={attention}"])
        torch.manual_seed(0)
        model = Transformer(config.model).cuda().train()
        tokens = torch.randint(0, config.model.vocab_size, (4, 64), device="cuda")
        targets = tokens.roll(-1, 1)
        targets[:, :8] = IGNORE_INDEX
        yield attention, model, tokens, targets


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_head_loss_matches_the_plain_one_on_cuda_in_bf16():
    for attention, model, tokens, targets in cuda_models():
        plain = cuda_bf16_step(model, tokens, targets, "torch", return_logits=True)
        assert_close_steps(cuda_bf16_step(model, tokens, targets, "torch"), plain, 1e-2, attention)


@pytest.mark.skipif(
    not torch.cuda.is_available() or fused.liger_available() is not None, reason="needs CUDA and liger-kernel"
)
def test_liger_kernels_match_the_torch_math_on_cuda():
    for attention, model, tokens, targets in cuda_models():
        reference = cuda_bf16_step(model, tokens, targets, "torch")
        assert_close_steps(cuda_bf16_step(model, tokens, targets, "liger"), reference, 1e-2, attention)


@pytest.mark.slow
def test_genesis_forward_and_fused_loss_trace_as_one_graph():
    """MLA, MoE (padded bmm in fp32 on CPU), MTP and the fused head loss: torch.compile sees one graph."""
    config = load_run_config("genesis-tiny", overrides=["model.n_layers=2"]).model
    model = Transformer(config).train()
    tokens = torch.randint(0, config.vocab_size, (2, 16))

    def loss(tokens, targets):
        return model(tokens, targets, mtp_weight=0.3, return_logits=False).loss

    explanation = torch._dynamo.explain(loss)(tokens, tokens.roll(-1, 1))
    assert explanation.graph_break_count == 0, explanation.break_reasons
