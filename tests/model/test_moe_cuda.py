"""MoE and a Genesis training step on a CUDA GPU (skipped without one; CI has none).

The dispatch on CUDA takes `torch._grouped_mm` only for bf16 on sm90+ with 16-byte aligned rows;
these tests pin that each shape takes the expected path and that both paths compute what an
fp32 run of the same layer computes, including experts that receive no token.
"""

from __future__ import annotations

import copy

import pytest
import torch

from darkhorse.config import load_run_config
from darkhorse.model import Transformer
from darkhorse.model.moe import MoE, grouped_mm_supported

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference.float()).norm() / reference.float().norm())


@pytest.mark.parametrize("dim, hidden", [(64, 32), (40, 20)], ids=["aligned", "unaligned"])
def test_bf16_dispatch_matches_fp32_on_cuda(dim, hidden):
    config = load_run_config(overrides=[
        f"model.dim={dim}", "model.n_heads=4", "model.ffn=moe", "model.moe.n_routed_experts=16",
        "model.moe.experts_per_token=4", f"model.moe.moe_intermediate_size={hidden}", "model.moe.bias_update_rate=0",
    ]).model  # fmt: skip
    torch.manual_seed(0)
    layer = MoE(config, layer_idx=0).cuda().to(torch.bfloat16)
    layer.gate.e_score_correction_bias[:3] = -100.0  # experts 0-2 never chosen: their grads must be 0
    reference = copy.deepcopy(layer).float()  # same (bf16-rounded) weights, same routing, fp32 padded bmm
    on_hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert grouped_mm_supported(torch.device("cuda"), torch.bfloat16, hidden, dim) == (on_hopper and dim == 64)

    x = torch.randn(2, 96, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    reference_x = x.detach().float().requires_grad_()
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected = reference(reference_x)
    expected.backward(grad.float())

    assert relative_error(out, expected) < 2e-2
    assert relative_error(x.grad, reference_x.grad) < 2e-2
    for (name, p), q in zip(layer.named_parameters(), reference.parameters(), strict=True):
        assert relative_error(p.grad, q.grad) < 2e-2, name
    assert layer.experts.down_proj.grad[:3].abs().max() == 0


def test_genesis_tiny_trains_and_decodes_on_cuda_in_bf16():
    from darkhorse.infer.engine import Engine

    config = load_run_config("genesis-tiny").model
    torch.manual_seed(0)
    model = Transformer(config).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    batch = torch.randint(0, config.vocab_size, (4, 65), device="cuda")
    losses = []
    for step in range(1, 21):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch[:, :-1], batch[:, 1:], mtp_weight=0.3).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.after_optimizer_step(step)
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 1.0
    model.eval()
    tokens = list(Engine(model).stream(batch[0, :8].tolist(), max_new_tokens=8))
    assert len(tokens) == 8
