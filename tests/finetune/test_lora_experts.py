"""The routed experts' fused LoRA SwiGLU (one autograd node over stacked gate|up weights) against the
autograd composition of the same grouped matmuls it replaces: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from darkhorse.errors import DarkhorseError
from darkhorse.finetune.lora import LoRAExperts
from darkhorse.model.moe import RoutedExperts
from darkhorse.train.expert_parallel import apply_expert_parallel


def lora_experts(experts=4, dim=32, hidden=48, r=8) -> LoRAExperts:
    torch.manual_seed(0)
    module = RoutedExperts(experts, dim, hidden)
    before = {name: t.clone() for name, t in module.state_dict().items()}
    module.__class__ = LoRAExperts
    module.requires_grad_(False)
    module.init_lora("routed_experts", r, 16.0, 0.0)
    for name, p in module.named_parameters():
        if name.endswith("lora_B"):  # B starts at zero; make every term count
            torch.nn.init.normal_(p, std=0.1)
    for name, tensor in before.items():  # the gate|up stacking keeps names and values
        assert torch.equal(module.state_dict()[name], tensor)
    return module


def forward_and_grads(module: LoRAExperts, fused: bool):
    counts = torch.tensor([5, 0, 7, 8])  # an expert without tokens too
    x = torch.randn(int(counts.sum()), 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = module(x, counts) if fused else RoutedExperts.forward(module, x, counts)
    weights = [x] + [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, weights, torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
    return out, grads


def test_fused_expert_lora_matches_the_autograd_path():
    module = lora_experts()
    assert module._gate_up_stack() is not None
    out, grads = forward_and_grads(module, fused=True)
    ref_out, ref_grads = forward_and_grads(module, fused=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert len(grads) == 7  # x and the six LoRA factors: nothing frozen trains
    for grad, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-6)


def test_a_second_backward_through_the_fused_node_raises():
    """Its backward reuses the saved activations' memory, so a retained graph must refuse a second pass."""
    module = lora_experts()
    counts = torch.tensor([5, 0, 7, 8])
    x = torch.randn(int(counts.sum()), 32, requires_grad=True)
    out = module(x, counts).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_unstacked_weights_fall_back_to_the_autograd_path():
    module = lora_experts()
    module.up_proj.data = module.up_proj.data.clone()  # what a dtype move does: separate storages
    assert module._gate_up_stack() is None
    out, _ = forward_and_grads(module, fused=True)
    ref_out, _ = forward_and_grads(module, fused=False)
    torch.testing.assert_close(out, ref_out)


def test_expert_parallelism_refuses_lora_experts_instead_of_dropping_their_adapters():
    holder = nn.Module()
    holder.experts = lora_experts()
    with pytest.raises(DarkhorseError, match="splits plain routed experts only, not LoRAExperts"):
        apply_expert_parallel(holder, rank=0, size=2)
