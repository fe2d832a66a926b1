"""HF import: tiny random transformers models (built locally, no hub) become checkpoints that compute the
same logits, generate and train; import -> export round-trips; bad input is refused by name."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from darkhorse.checkpoint import load_model
from darkhorse.cli import main
from darkhorse.errors import DarkhorseError
from darkhorse.interop.export import export_checkpoint
from darkhorse.interop.hf_import import import_hf

transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 300, 11, 64, 2, 150]])
SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rope_theta=20000.0, rms_norm_eps=1e-6)  # fmt: skip
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
DEEPSEEK = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_group=2, topk_group=1, max_position_embeddings=64, routed_scaling_factor=2.5,
)  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # fmt: skip
SOURCES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", SMALL),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {**SMALL, "tie_word_embeddings": True}),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {**SMALL, "sliding_window": 32}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SMALL),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**SMALL, "head_dim": 16}),
    "qwen3-wide-heads": ("Qwen3Config", "Qwen3ForCausalLM", {**SMALL, "head_dim": 32}),  # 4 x 32 != 64
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", {**SMALL, "rope_scaling": LLAMA3_ROPE}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**SMALL, **MOE}),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", DEEPSEEK),
}


@functools.cache
def darkhorse_tokenizer_json() -> str:
    from darkhorse.data.tokenizer import Tokenizer

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return Tokenizer.train([" ".join(words[i:] + words[:i]) for i in range(8)] * 4, vocab_size=300).to_json()


def build_hf_model(folder, name: str, *, fused: bool = False, shard: str | None = None, seed: int = 0):
    """A random transformers model (norm gains and the router bias randomised too) saved to `folder`,
    with a darkhorse tokenizer (as a model that went out and comes back has)."""
    config_cls, model_cls, kwargs = SOURCES[name]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor))
            elif key.endswith("e_score_correction_bias") or key.endswith("bias"):
                tensor.copy_(0.05 * torch.randn_like(tensor))
    options = {"save_original_format": False} if fused else {}
    model.save_pretrained(str(folder), max_shard_size=shard or "5GB", **options)
    (folder / "tokenizer.json").write_text(darkhorse_tokenizer_json())
    with torch.no_grad():
        return model(TOKENS).logits


def darkhorse_logits(checkpoint) -> torch.Tensor:
    model, _, _ = load_model(checkpoint)
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("name", list(SOURCES))
def test_import_matches_transformers_and_round_trips(tmp_path, name):
    expected = build_hf_model(tmp_path / "hf", name)
    checkpoint = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    torch.testing.assert_close(darkhorse_logits(checkpoint), expected, atol=1e-4, rtol=0)
    exported = export_checkpoint(checkpoint, tmp_path / "again", "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, expected, atol=1e-4, rtol=0)


def test_llama3_rope_and_explicit_head_dim_reach_the_config(tmp_path):
    build_hf_model(tmp_path / "hf", "llama3-rope")
    scaling = load_model(import_hf(tmp_path / "hf", tmp_path / "llama3"))[1].model.rope_scaling
    assert (scaling.type, scaling.factor, scaling.original_max_seq_len) == ("llama3", 4.0, 16)
    assert (scaling.low_freq_factor, scaling.high_freq_factor) == (1.0, 4.0)
    with pytest.raises(DarkhorseError, match="rope_scaling.type=llama3 is not written to GGUF"):
        export_checkpoint(tmp_path / "llama3", tmp_path / "llama3.gguf", "gguf")
    assert not (tmp_path / "llama3.gguf").exists()

    build_hf_model(tmp_path / "hf-qwen", "qwen3-wide-heads")
    model, config, _ = load_model(import_hf(tmp_path / "hf-qwen", tmp_path / "qwen"))
    assert config.model.head_dim == 32 and config.model.dim == 64
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf-qwen"))
    assert model.num_params() == hf_model.num_parameters()
    assert model.kv_cache_values_per_token() == 2 * 2 * 2 * 32  # layers x (k, v) x kv heads x head_dim


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_import_reads_fused_expert_layout(tmp_path, name):
    expected = build_hf_model(tmp_path / "hf", name, fused=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as weights:
        names = set(weights.keys())
    assert any(key.endswith("mlp.experts.gate_up_proj") for key in names)
    checkpoint = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    torch.testing.assert_close(darkhorse_logits(checkpoint), expected, atol=1e-4, rtol=0)


def test_import_reads_shards_and_records_the_source(tmp_path):
    expected = build_hf_model(tmp_path / "hf", "llama", shard="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    checkpoint = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    torch.testing.assert_close(darkhorse_logits(checkpoint), expected, atol=1e-4, rtol=0)
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["import"]["architecture"] == "LlamaForCausalLM" and meta["step"] == 0


def test_imported_checkpoint_generates_and_trains(tmp_path, capsys):
    build_hf_model(tmp_path / "hf", "llama")
    checkpoint = tmp_path / "run" / "final"
    assert main(["import", str(tmp_path / "hf"), "--out", str(checkpoint)]) == 0
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "alpha beta", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()

    model, config, _ = load_model(checkpoint)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 300, (2, 17))
    losses = []
    for step in range(3):
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_optimizer_step(step)
        losses.append(loss.item())
    assert losses[-1] < losses[0] and config.train.seq_len <= config.model.max_seq_len


def test_foreign_tokenizer_is_kept_and_its_gaps_recorded(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    build_hf_model(tmp_path / "hf", "llama")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(["hello world"] * 5, trainers.BpeTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    settings = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ messages }}"}
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(settings))
    checkpoint = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    record = json.loads((checkpoint / "meta.json").read_text())["import"]["tokenizer"]
    assert record["eos_token"] == "</s>" and record["chat_template"] == "{{ messages }}"
    assert "<|eos|>" in record["missing_chat_tokens"] and "<|user|>" in record["missing_chat_tokens"]
    assert (checkpoint / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()
    exported = export_checkpoint(checkpoint, tmp_path / "again", "hf")  # the source's own template goes out
    assert json.loads((exported / "tokenizer_config.json").read_text())["chat_template"] == "{{ messages }}"
    assert json.loads((exported / "config.json").read_text())["eos_token_id"] == 2


def test_state_dict_export_imports_back(tmp_path):
    build_hf_model(tmp_path / "hf", "qwen3")
    checkpoint = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    export_checkpoint(checkpoint, tmp_path / "plain", "pt")
    again = import_hf(tmp_path / "plain", tmp_path / "ckpt2")
    torch.testing.assert_close(darkhorse_logits(again), darkhorse_logits(checkpoint), atol=0, rtol=0)


def test_bad_input_is_named_and_leaves_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    build_hf_model(tmp_path / "hf", "llama")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())

    config_file.write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(DarkhorseError, match="GPT2LMHeadModel is not supported; supported: LlamaForCausalLM, Mistral"):
        import_hf(tmp_path / "hf", tmp_path / "out")

    config_file.write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(DarkhorseError, match=r"layers\.0\.ffn\.gate_proj\.weight <- model\.layers\.0\.mlp\.gate_proj"):
        import_hf(tmp_path / "hf", tmp_path / "out")

    config_file.write_text(json.dumps(config))
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    weights["model.layers.1.extra.weight"] = weights.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), {"format": "pt"})
    with pytest.raises(DarkhorseError, match=r"missing: model\.layers\.1\.self_attn\.k_proj\.weight; "
                                             r"unexpected: model\.layers\.1\.extra\.weight"):  # fmt: skip
        import_hf(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))

    (tmp_path / "out").mkdir()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
