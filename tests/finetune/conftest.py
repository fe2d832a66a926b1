"""Tiny bases for the fine-tuning and merge tests: Hugging Face models that transformers builds from a config
(Mixtral, Genesis = DeepseekV3 with MLA + MoE, dense Llama), each with a small Llama-3-style tokenizer and chat
template; chat data in the shape the seed workflow uses; and LoRA adapters made by PEFT itself (the format
`darkhorse finetune` writes and `darkhorse merge` reads). Test files import these helpers as
`from tests.finetune.conftest import ...`.

The weights are drawn with initializer_range 0.1 (not 0.02) so next-token and routing scores are spread out:
greedy comparisons against llama.cpp cannot pass or fail on a near-tie.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_CYCLE, write_foreign_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

VOCAB = 300  # write_foreign_tokenizer's vocabulary
# train.* settings of a few-step toy LoRA run
SMALL_RUN = ["train.seq_len=32", "train.batch_size=4", "train.log_interval=1", "train.eval_steps=1", "train.lr=1e-2"]
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1)  # fmt: skip
DENSE_MLP = ["gate_proj", "up_proj", "down_proj"]  # DeepSeek: the shared expert and the dense first layer
ROUTER_AND_EXPERTS = ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# family -> (config class, model class, config, the LoraConfig of `make_peft_adapter`: the seed's router r16 /
# experts r32, scaled down; the router's smaller rank through rank_pattern, experts and router through PEFT's
# target_parameters)
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
    config_cls, model_cls, kwargs, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    model.save_pretrained(str(folder))
    write_foreign_tokenizer(folder)
    return folder


def make_peft_adapter(base_hf, out, family: str, *, seed: int = 1, **lora):
    """A LoRA adapter on `base_hf` saved by PEFT itself to `out`; `lora` overrides the family's LoraConfig.

    B is randomised: PEFT starts it at zero, and an untrained adapter's delta is zero (merge refuses it);
    so are `modules_to_save` copies, which PEFT starts as the base's own."""
    import peft

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_hf), dtype=torch.float32)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**{**FAMILIES[family][3], **lora}))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn_like(param))
            elif "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    wrapped.save_pretrained(str(out))
    return out


def write_chats(path, count: int = 40, offset: int = 0):
    """Chat records: a user names a word of the cycle, the assistant answers with the next words."""
    words = list(TINY_CYCLE)
    with open(path, "w") as handle:
        for k in range(count):
            i = (k + offset) % len(words)
            reply = " ".join(words[(i + j) % len(words)] for j in range(1, 6))
            messages = [{"role": "user", "content": f"after {words[i]}"}, {"role": "assistant", "content": reply}]
            if k % 3 == 0:
                messages = [{"role": "system", "content": "count on"}, *messages]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="session")
def mixtral_base(tmp_path_factory):
    return build_hf_base(tmp_path_factory.mktemp("hf-mixtral") / "base", "mixtral")


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory):
    return build_hf_base(tmp_path_factory.mktemp("hf-llama") / "base", "llama", seed=1)


@pytest.fixture(scope="session")
def chat_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chats")
    return write_chats(folder / "chats.jsonl"), write_chats(folder / "memory.jsonl", count=20, offset=7)
