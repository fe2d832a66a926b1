"""HF export: transformers loads what we write and computes the same logits; the chat template renders
our chat format; plain state-dict exports load back; bad input is refused without leaving files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from darkhorse.checkpoint import load_model, save_model_checkpoint
from darkhorse.config import MLAConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig
from darkhorse.errors import DarkhorseError
from darkhorse.interop.export import export_checkpoint, load_state_dict_export
from darkhorse.model import Transformer

transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 300, 11, 64, 2, 150]])

DENSE = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64, rope_theta=50000.0)
ARCHITECTURES = {
    "LlamaForCausalLM": ModelConfig(vocab_size=300, **DENSE),
    "MixtralForCausalLM": ModelConfig(
        vocab_size=300, tie_embeddings=False, ffn="moe", **DENSE,
        moe=MoEConfig(n_routed_experts=4, n_shared_experts=0, experts_per_token=2, moe_intermediate_size=32,
                      scoring="softmax", first_k_dense=0, bias_update_rate=0.0),
    ),
    "DeepseekV3ForCausalLM": ModelConfig(
        vocab_size=300, n_layers=3, dim=64, n_heads=4, n_kv_heads=4, ffn_dim=96, max_seq_len=64, norm_eps=1e-6,
        tie_embeddings=False, attention="mla", ffn="moe", mtp_depth=1,
        mla=MLAConfig(q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, experts_per_token=2, moe_intermediate_size=32,
                      first_k_dense=1, routed_scaling_factor=2.5),
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from darkhorse.data.chat_format import render_conversation
    from darkhorse.data.tokenizer import Tokenizer

    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "to", "see", "dog", "who", "was", "happy"]
    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 3
    texts.append(render_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]))
    return Tokenizer.train(texts, vocab_size=300, min_frequency=1).save(tmp_path_factory.mktemp("tok") / "t.json")


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere (norm gains and the MoE bias too), so every mapping is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator) * 0.1
                tensor.copy_(1.0 + noise if tensor.dim() == 1 and name.endswith("norm.weight") else noise)
    return model


def make_checkpoint(path, model_config: ModelConfig, tokenizer_file, *, zero_bias: bool = False):
    model = randomize(Transformer(model_config))
    if zero_bias:
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.zero_()
    config = RunConfig(name="tiny", model=model_config, train=TrainConfig(seq_len=32))
    save_model_checkpoint(path, model.eval(), config, tokenizer_file, {"step": 7, "loss": 1.0})
    return path


def hf_logits(folder) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def our_logits(checkpoint) -> torch.Tensor:
    model, _, _ = load_model(checkpoint)
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_transformers_loads_export_with_same_logits(tmp_path, tokenizer_file, architecture):
    model_config = ARCHITECTURES[architecture]
    checkpoint = make_checkpoint(
        tmp_path / "ckpt", model_config, tokenizer_file, zero_bias=architecture == "MixtralForCausalLM"
    )
    out = export_checkpoint(checkpoint, tmp_path / "hf", "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert config["vocab_size"] == model_config.padded_vocab_size == 320
    expected = our_logits(checkpoint)
    torch.testing.assert_close(hf_logits(out), expected, atol=1e-4, rtol=0)
    assert not list(tmp_path.glob(".hf.partial-*"))


def test_deepseek_export_declares_routing_and_mtp(tmp_path, tokenizer_file):
    from safetensors import safe_open

    checkpoint = make_checkpoint(tmp_path / "ckpt", ARCHITECTURES["DeepseekV3ForCausalLM"], tokenizer_file)
    out = export_checkpoint(checkpoint, tmp_path / "hf", "hf", dtype="bf16")
    config = json.loads((out / "config.json").read_text())
    assert (config["scoring_func"], config["topk_method"], config["num_nextn_predict_layers"]) == (
        "sigmoid", "noaux_tc", 1,
    )  # fmt: skip
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
        bias = weights.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias")
        assert bias.dtype == torch.float32 and bias.abs().sum() > 0  # kept fp32 in a bf16 export
        assert weights.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight").dtype == torch.bfloat16
        torch.testing.assert_close(
            weights.get_tensor("model.layers.3.embed_tokens.weight"), weights.get_tensor("model.embed_tokens.weight")
        )
    mtp_layer = {"enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "self_attn.kv_b_proj"}
    assert all(f"model.layers.3.{part}.weight" in names for part in mtp_layer)
    assert not any(".mlp.experts.gate_up_proj" in name for name in names)  # per-expert keys only


def test_sharded_export_has_index_and_loads(tmp_path, tokenizer_file):
    checkpoint = make_checkpoint(tmp_path / "ckpt", ARCHITECTURES["LlamaForCausalLM"], tokenizer_file)
    out = export_checkpoint(checkpoint, tmp_path / "hf", "hf", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert not (out / "model.safetensors").exists()
    torch.testing.assert_close(hf_logits(out), our_logits(checkpoint), atol=1e-4, rtol=0)


def test_chat_template_gives_our_tokens(tmp_path, tokenizer_file):
    from darkhorse.data.chat_format import render_conversation, render_prompt
    from darkhorse.data.tokenizer import Tokenizer

    checkpoint = make_checkpoint(tmp_path / "ckpt", ARCHITECTURES["LlamaForCausalLM"], tokenizer_file)
    out = export_checkpoint(checkpoint, tmp_path / "hf", "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    ours = Tokenizer.from_file(tokenizer_file)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the cat sat"},
        {"role": "assistant", "content": "on a mat", "reasoning": "cats sit"},
    ]
    rendered = theirs.apply_chat_template(messages, tokenize=True)
    assert list(getattr(rendered, "input_ids", rendered)) == ours.encode(render_conversation(messages))
    prompt = theirs.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True)
    assert list(getattr(prompt, "input_ids", prompt)) == ours.encode(render_prompt(messages[:2]))
    assert theirs.eos_token == "<|eos|>" and theirs.bos_token == "<|bos|>"
    assert json.loads((out / "special_tokens_map.json").read_text())["pad_token"] == "<|pad|>"


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_state_dict_export_loads_back(tmp_path, tokenizer_file, fmt):
    checkpoint = make_checkpoint(tmp_path / "ckpt", ARCHITECTURES["LlamaForCausalLM"], tokenizer_file)
    out = export_checkpoint(checkpoint, tmp_path / "plain", fmt)
    if fmt == "pt":
        state = torch.load(out / "model.pt", weights_only=True)
        assert "embed.weight" in state and "lm_head.weight" not in state  # tied weights stored once
    model, config, record = load_state_dict_export(out)
    assert record["step"] == 7 and config.model == ARCHITECTURES["LlamaForCausalLM"]
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, our_logits(checkpoint), atol=0, rtol=0)


def test_mhc_and_unrepresentable_models_are_refused(tmp_path, tokenizer_file):
    mhc = ModelConfig(vocab_size=300, residual="mhc", **DENSE)
    checkpoint = make_checkpoint(tmp_path / "mhc", mhc, tokenizer_file)
    with pytest.raises(DarkhorseError, match="model.residual=mhc"):
        export_checkpoint(checkpoint, tmp_path / "out", "hf")
    sigmoid_moe = ModelConfig(vocab_size=300, ffn="moe", **DENSE, moe=MoEConfig(n_shared_experts=1, first_k_dense=0))
    checkpoint = make_checkpoint(tmp_path / "moe", sigmoid_moe, tokenizer_file)
    with pytest.raises(DarkhorseError, match="MixtralForCausalLM: model.moe.scoring=sigmoid.*shared experts"):
        export_checkpoint(checkpoint, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_mixtral_export_refuses_a_selection_bias(tmp_path, tokenizer_file):
    checkpoint = make_checkpoint(tmp_path / "ckpt", ARCHITECTURES["MixtralForCausalLM"], tokenizer_file)
    with pytest.raises(DarkhorseError, match="e_score_correction_bias is not all 0: Mixtral"):
        export_checkpoint(checkpoint, tmp_path / "out", "hf")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_existing_out_needs_force(tmp_path, tokenizer_file):
    checkpoint = make_checkpoint(tmp_path / "ckpt", ARCHITECTURES["LlamaForCausalLM"], tokenizer_file)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DarkhorseError, match="--force"):
        export_checkpoint(checkpoint, out, "hf")
    assert (out / "keep.txt").read_text() == "mine"
    export_checkpoint(checkpoint, out, "hf", force=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_deepseek_export_of_a_group_context_routes_each_token_by_its_own_scores(tmp_path, tokenizer_file, caplog):
    """model.moe.group_context is darkhorse inference only: the export drops it, says so, and computes what
    our model computes without it (each layer ranks a token's groups by its own scores, W = 0)."""
    deepseek = ARCHITECTURES["DeepseekV3ForCausalLM"]
    moe = dataclasses.replace(deepseek.moe, domain_routing="isolated", n_domains=2, group_context=True)
    checkpoint = make_checkpoint(tmp_path / "ckpt", dataclasses.replace(deepseek, moe=moe), tokenizer_file)
    with caplog.at_level("WARNING", logger="darkhorse"):
        out = export_checkpoint(checkpoint, tmp_path / "hf", "hf")
    assert "model.moe.group_context and model.moe.domain_posterior are darkhorse inference only" in caplog.text
    model, config, _ = load_model(checkpoint)
    without = Transformer(dataclasses.replace(config.model, moe=dataclasses.replace(moe, group_context=False)))
    without.load_state_dict(model.state_dict(), strict=False)  # all but the context heads
    with torch.no_grad():
        with_context, own_scores = model(TOKENS).logits, without.eval()(TOKENS).logits
    assert not torch.allclose(with_context, own_scores, atol=1e-3)  # the context changes some token's group
    torch.testing.assert_close(hf_logits(out), own_scores, atol=1e-4, rtol=0)


def test_deepseek_export_of_unequal_domain_groups_matches(tmp_path, tokenizer_file):
    """Domains owning 3 and 1 experts route in groups of one expert, which transformers cannot hold (it ranks a
    group by its two best experts): with k of them kept that is no limit, exported as one group."""
    deepseek = ARCHITECTURES["DeepseekV3ForCausalLM"]
    moe = dataclasses.replace(deepseek.moe, domain_routing="isolated", n_domains=2, domain_experts=[3, 1])
    assert (moe.n_groups, moe.topk_groups) == (4, 2)
    checkpoint = make_checkpoint(tmp_path / "ckpt", dataclasses.replace(deepseek, moe=moe), tokenizer_file)
    out = export_checkpoint(checkpoint, tmp_path / "hf", "hf")
    hf = json.loads((out / "config.json").read_text())
    assert (hf["n_group"], hf["topk_group"]) == (1, 1)
    torch.testing.assert_close(hf_logits(out), our_logits(checkpoint), atol=1e-4, rtol=0)


def test_deepseek_export_of_all_rope_heads_matches(tmp_path, tokenizer_file):
    """qk_nope_head_dim 0 (every q/k dim positional) exports and transformers agrees."""
    base = ARCHITECTURES["DeepseekV3ForCausalLM"]
    model_config = dataclasses.replace(base, mla=dataclasses.replace(base.mla, qk_nope_head_dim=0, qk_rope_head_dim=24))
    checkpoint = make_checkpoint(tmp_path / "ckpt", model_config, tokenizer_file)
    out = export_checkpoint(checkpoint, tmp_path / "hf", "hf")
    assert json.loads((out / "config.json").read_text())["qk_nope_head_dim"] == 0
    torch.testing.assert_close(hf_logits(out), our_logits(checkpoint), atol=1e-4, rtol=0)
