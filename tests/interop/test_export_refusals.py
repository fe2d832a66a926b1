"""HF and GGUF export refuse a model they cannot represent with the same reasons (interop/capabilities.py)."""

from __future__ import annotations

import pytest

from darkhorse.checkpoint import save_model_checkpoint
from darkhorse.config import MLAConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig
from darkhorse.errors import DarkhorseError
from darkhorse.interop.export import export_checkpoint
from darkhorse.model import Transformer

pytest.importorskip("gguf")

GQA = dict(vocab_size=300, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
MIXTRAL_MOE = dict(n_routed_experts=4, n_shared_experts=0, experts_per_token=2, moe_intermediate_size=32,
                   scoring="softmax", first_k_dense=0, bias_update_rate=0.0)  # fmt: skip
MLA = MLAConfig(q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)

UNEXPORTABLE = {
    "mhc": (ModelConfig(residual="mhc", **GQA), "model.residual=mhc (hyper-connections)"),
    "gpt2-blocks": (
        ModelConfig(ffn_activation="gelu", positions="learned", logit_softcap=15.0, **GQA),
        "model.ffn_activation=gelu (an ungated MLP) has no transformers or llama.cpp architecture here; use "
        "--format safetensors or pt; model.positions=learned (absolute position embeddings) has no transformers",
    ),
    "value-embeds": (ModelConfig(value_embeds=1, **GQA), "model.value_embeds=1 (value embeddings) has no transformers"),
    "smear": (ModelConfig(smear="kv", **GQA), "model.smear=kv (each token's embedding mixed with the previous"),
    "mixtral-sigmoid-shared": (
        ModelConfig(ffn="moe", moe=MoEConfig(**{**MIXTRAL_MOE, "scoring": "sigmoid", "n_shared_experts": 1}), **GQA),
        "model.moe.scoring=sigmoid (Mixtral routes by softmax); model.moe.n_shared_experts > 0",
    ),
    "mixtral-capacity": (
        ModelConfig(ffn="moe", moe=MoEConfig(**MIXTRAL_MOE, capacity_factor=1.25), **GQA),
        "model.moe.capacity_factor > 0 (drops tokens",
    ),
    "deepseek-no-shared-expert": (
        ModelConfig(**{**GQA, "n_kv_heads": 4}, attention="mla", mla=MLA, ffn="moe",
                    moe=MoEConfig(n_routed_experts=4, n_shared_experts=0, moe_intermediate_size=32)),
        "model.moe.n_shared_experts=0 (DeepSeek's MoE has shared experts)",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from darkhorse.data.tokenizer import Tokenizer

    texts = ["the cat sat on a mat and then ran to see a dog"] * 4
    return Tokenizer.train(texts, vocab_size=300, min_frequency=1).save(tmp_path_factory.mktemp("tok") / "t.json")


def refusal_reasons(checkpoint, out, fmt: str) -> str:
    """The reasons part of the error: what follows 'cannot export to <target>: '."""
    with pytest.raises(DarkhorseError, match="cannot export to") as refused:
        export_checkpoint(checkpoint, out, fmt)
    assert not out.exists()
    return str(refused.value).split("cannot export to ", 1)[1].split(": ", 1)[1]


@pytest.mark.parametrize("case", UNEXPORTABLE)
def test_hf_and_gguf_refuse_with_the_same_reasons(tmp_path, tokenizer_file, case):
    model_config, expected = UNEXPORTABLE[case]
    config = RunConfig(model=model_config, train=TrainConfig(seq_len=32))
    checkpoint = save_model_checkpoint(tmp_path / "ckpt", Transformer(model_config), config, tokenizer_file, {})
    hf = refusal_reasons(checkpoint, tmp_path / "hf", "hf")
    gguf = refusal_reasons(checkpoint, tmp_path / "m.gguf", "gguf")
    assert hf == gguf
    assert expected in hf
