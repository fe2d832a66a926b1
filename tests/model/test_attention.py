"""Attention: GQA against a plain multi-head reference, causality, cached decoding, MLA layout."""

from __future__ import annotations

import math

import pytest
import torch

from darkhorse.config import load_run_config
from darkhorse.model import Transformer
from darkhorse.model.attention import GroupedQueryAttention, MultiHeadLatentAttention, deinterleave
from darkhorse.model.layers import rope_tables

torch.manual_seed(0)


def small_config(*overrides: str):
    base = [
        "model.vocab_size=256",
        "model.dim=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.ffn_dim=128",
        "model.max_seq_len=64",
        "train.seq_len=32",
    ]
    return load_run_config(overrides=[*base, *overrides]).model


MLA = (
    "model.attention=mla",
    "model.mla.kv_lora_rank=32",
    "model.mla.qk_nope_head_dim=16",
    "model.mla.qk_rope_head_dim=8",
    "model.mla.v_head_dim=12",
)
MLA_MOE = (
    *MLA,
    "model.mla.q_lora_rank=24",
    "model.ffn=moe",
    "model.moe.n_routed_experts=4",
    "model.moe.moe_intermediate_size=32",
    "model.moe.first_k_dense=1",
    "model.mtp_depth=1",
)
MLA_ALL_ROPE = (*MLA, "model.mla.qk_nope_head_dim=0", "model.mla.qk_rope_head_dim=24")  # no content part
GPT2 = ("model.ffn_activation=gelu", "model.positions=learned", "model.mtp_depth=1")  # the recipe bench's baseline
LEVERS = ("model.ffn_activation=relu2", "model.logit_softcap=15", "model.qk_norm=true", "model.zero_init_out=true")


def reference_mha(x, attn: GroupedQueryAttention, cos, sin):
    """Textbook causal multi-head attention with half-split RoPE, written out by hand."""
    batch, seq, _ = x.shape
    heads, dim = attn.n_heads, attn.head_dim

    def split(t):
        return t.view(batch, seq, heads, dim).transpose(1, 2)

    def rotate(t):
        half = dim // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    q, k = rotate(q), rotate(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def test_gqa_with_all_kv_heads_is_plain_multi_head_attention():
    config = small_config("model.n_kv_heads=4")
    attn = GroupedQueryAttention(config)
    cos, sin = rope_tables(attn.rotary_dim, 16, config.rope_theta, config.rope_scaling)
    x = torch.randn(2, 16, config.dim)
    torch.testing.assert_close(attn(x, (cos, sin)), reference_mha(x, attn, cos, sin), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra", [(), MLA, MLA_MOE, GPT2, LEVERS], ids=["gqa", "mla", "mla-moe-mtp", "gpt2", "levers"])
def test_future_tokens_do_not_change_past_logits(extra):
    model = Transformer(small_config(*extra)).eval()
    tokens = torch.randint(0, 256, (1, 20))
    changed = tokens.clone()
    changed[0, 12:] = torch.randint(0, 256, (8,))
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize(
    "extra",
    [(), MLA, MLA_MOE, (*MLA, "model.residual=mhc", "model.mhc.expansion=2"), GPT2, LEVERS, MLA_ALL_ROPE],
    ids=["gqa", "mla", "mla-moe-mtp", "mla-mhc", "gpt2", "levers", "mla-all-rope"],
)
def test_cached_decoding_matches_full_forward(extra):
    model = Transformer(small_config(*extra)).eval()
    tokens = torch.randint(0, 256, (2, 24))
    cache = model.new_cache(batch=2, max_len=32)
    with torch.no_grad():
        full = model(tokens).logits
        prefix = model(tokens[:, :10], cache=cache, start_pos=0).logits
        steps = [model(tokens[:, i : i + 1], cache=cache, start_pos=i).logits for i in range(10, 20)]
        chunk = model(tokens[:, 20:], cache=cache, start_pos=20).logits  # multi-token chunk after a prefix
    decoded = torch.cat([prefix, *steps, chunk], dim=1)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)


def test_mla_cache_holds_only_latent_and_rope_key():
    config = small_config(*MLA)
    attn = MultiHeadLatentAttention(config)
    assert attn.cache_values_per_token() == 32 + 8
    cache = attn.new_cache(batch=1, max_len=10, device="cpu", dtype=torch.float32)
    assert cache.nbytes == 10 * (32 + 8) * 4
    model = Transformer(config)
    assert model.kv_cache_values_per_token() == config.n_layers * (32 + 8)


def test_mla_parameter_layout_follows_deepseek_v3():
    config = small_config(*MLA, "model.mla.q_lora_rank=24")
    shapes = {name: tuple(p.shape) for name, p in MultiHeadLatentAttention(config).named_parameters()}
    assert shapes == {
        "q_a_proj.weight": (24, 64),
        "q_a_layernorm.weight": (24,),
        "q_b_proj.weight": (4 * (16 + 8), 24),
        "kv_a_proj_with_mqa.weight": (32 + 8, 64),
        "kv_a_layernorm.weight": (32,),
        "kv_b_proj.weight": (4 * (16 + 12), 32),
        "o_proj.weight": (64, 4 * 12),
    }


def test_deinterleave_turns_pairs_into_halves():
    assert deinterleave(torch.arange(6.0)).tolist() == [0, 2, 4, 1, 3, 5]


def test_mla_matches_transformers_deepseek_v3_attention():
    """Same weights in HF's DeepseekV3Attention (rope_interleave, YaRN mscale) give the same output."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as modeling

    yarn = (
        "model.rope_scaling.type=yarn",
        "model.rope_scaling.factor=4",
        "model.rope_scaling.original_max_seq_len=16",
        "model.rope_scaling.mscale=1.0",
        "model.rope_scaling.mscale_all_dim=1.0",
    )
    config = small_config(*MLA, "model.mla.q_lora_rank=24", *yarn)
    ours = MultiHeadLatentAttention(config).eval()
    hf_config = DeepseekV3Config(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=24,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_interleave=True,
        attention_bias=False,
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )
    hf_config._attn_implementation = "eager"
    theirs = modeling.DeepseekV3Attention(hf_config, layer_idx=0).eval()
    missing = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not missing.missing_keys and not missing.unexpected_keys
    for name in ("q_a_layernorm", "kv_a_layernorm"):
        getattr(theirs, name).variance_epsilon = config.norm_eps
    rotary = modeling.DeepseekV3RotaryEmbedding(hf_config)
    x = torch.randn(2, 20, 64)
    positions = torch.arange(20).unsqueeze(0)
    mask = torch.full((20, 20), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected = theirs(x, position_embeddings=rotary(x, positions), attention_mask=mask)[0]
        cos, sin = rope_tables(8, 20, config.rope_theta, config.rope_scaling)
        torch.testing.assert_close(ours(x, (cos, sin)), expected, atol=1e-5, rtol=1e-4)
