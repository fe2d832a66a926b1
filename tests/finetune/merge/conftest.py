"""Tiny transformers bases (Mixtral, Genesis = DeepseekV3, Llama) with a Llama-3-style tokenizer, and LoRA
adapters on them made by PEFT itself: the format `darkhorse finetune` writes and `darkhorse merge` reads."""

from __future__ import annotations

import torch

VOCAB = 300  # tests/conftest.py's write_foreign_tokenizer
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1)  # fmt: skip
DENSE_MLP = ["gate_proj", "up_proj", "down_proj"]  # DeepSeek: the shared expert and the dense first layer
ROUTER_AND_EXPERTS = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# family -> (config class, model class, config, LoraConfig: the seed's router r16 / experts r32, scaled down;
# the router's smaller rank through rank_pattern, experts and router through PEFT's target_parameters)
FAMILIES = {
    "mixtral": (
        "MixtralConfig", "MixtralForCausalLM", {**SHAPE, "num_key_value_heads": 2, "num_local_experts": 8,
                                                "num_experts_per_tok": 2},
        dict(r=8, lora_alpha=16, target_modules=[], target_parameters=ROUTER_AND_EXPERTS,
             rank_pattern={"mlp.gate.weight": 4}, alpha_pattern={"mlp.gate.weight": 8}),
    ),
    "genesis": (
        "DeepseekV3Config", "DeepseekV3ForCausalLM", {**SHAPE, "num_key_value_heads": 4, "moe_intermediate_size": 32,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
        "n_group": 1, "topk_group": 1, "num_hidden_layers": 3},
        dict(r=8, lora_alpha=16, target_modules=["q_b_proj", "kv_b_proj", "o_proj", *DENSE_MLP],
             target_parameters=ROUTER_AND_EXPERTS, rank_pattern={"mlp.gate.weight": 4}),
    ),
    "llama": (
        "LlamaConfig", "LlamaForCausalLM", {**SHAPE, "num_key_value_heads": 2},
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", *DENSE_MLP]),
    ),
}  # fmt: skip


def build_hf_base(folder, family: str, *, seed: int = 0):
    """A random transformers model of `family` saved to `folder` with a Llama-3-style tokenizer and chat template."""
    import transformers

    from tests.conftest import write_foreign_tokenizer

    config_cls, model_cls, kwargs, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    model.save_pretrained(str(folder))
    write_foreign_tokenizer(folder)
    return folder


def make_peft_adapter(base_hf, out, family: str, *, seed: int = 1, **lora):
    """A LoRA adapter on `base_hf` saved by PEFT itself to `out`; `lora` overrides the family's LoraConfig.

    B is randomised: PEFT starts it at zero, and an untrained adapter's delta is zero (merge refuses it)."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_hf), dtype=torch.float32)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**{**FAMILIES[family][3], **lora}))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn_like(param))
    wrapped.save_pretrained(str(out))
    return out
