"""The fused LoRA paths compute what one LoRA layer per projection computes (fast, no files)."""

from __future__ import annotations

import torch

from darkhorse.config import ModelConfig
from darkhorse.finetune.lora import LoRAAttention, LoRASpec, apply_lora, lora_parameters
from darkhorse.model import Transformer
from darkhorse.model.attention import GroupedQueryAttention


def test_fused_qkv_lora_equals_three_lora_linears():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128, attention_bias=True)
    model = Transformer(config).train()
    apply_lora(model, LoRASpec(("attention",), r=4, alpha=8.0))
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.1)
    attn = model.layers[0].attn
    assert type(attn) is LoRAAttention

    def packed() -> bool:  # q/k/v weights in one storage, read as one matrix without a copy
        return attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()

    tokens = torch.randint(0, 64, (2, 9))

    def logits_and_grads(fused: bool):
        for block in model.layers:
            block.attn.__class__ = LoRAAttention if fused else GroupedQueryAttention
        model.zero_grad(set_to_none=True)
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        return out.logits.detach(), {n: p.grad for n, p in lora_parameters(model).items()}

    for dtype in (torch.float32, torch.float64):  # float64: `.to()` unpacks the weights, the copy path runs
        model.to(dtype)
        assert packed() == (dtype == torch.float32)
        (fused, fused_grads), (plain, plain_grads) = logits_and_grads(True), logits_and_grads(False)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7)
