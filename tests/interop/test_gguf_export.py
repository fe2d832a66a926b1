"""GGUF export: llama.cpp (through llama-cpp-python) loads the file and computes what darkhorse computes.

Tolerances are on the largest absolute logit difference over every position and every vocab row of
a 44-token sequence (logits here span roughly -10..+11, std ~1.7). llama.cpp runs with an F32 KV
cache so the comparison measures the file's weights, not llama.cpp's default F16 cache. Measured on
the tiny trained models of conftest.py (tied and untied), then given about 5x headroom:

* f32: measured <= 1.4e-5 (summation order only) -> 1e-4.
* f16: weights rounded to 11 significant bits (relative error <= 2^-11 ~ 4.9e-4); measured <= 1.8e-3 -> 2e-2.
* bf16: 8 significant bits, 8x coarser than f16; measured <= 2.2e-2 -> 1e-1.
* q8_0: 8-bit weights per block of 32 plus llama.cpp quantizing activations to 8 bits inside its
  matmuls; measured <= 5.5e-2 -> 3e-1.

MoE (deepseek2) adds one effect: routing is discrete, so where two experts' scores nearly tie, bf16
or q8_0 rounding can pick the other one and that token's logits move by O(1) (measured: 1 of 44
positions at 0.67, all others <= 0.04). For MoE models we therefore allow up to 2 positions
outside the tolerance for bf16 and q8_0, and none for f32 and f16.

The greedy check needs no tolerance: the model is trained on a word cycle, so each step's top logit
leads the runner-up by far more than these differences, and any layout mistake (RoPE row order,
tied head, vocab padding) breaks it immediately.
"""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from darkhorse.checkpoint import load_model, save_model_checkpoint
from darkhorse.config import ModelConfig, RopeScalingConfig, RunConfig, TrainConfig
from darkhorse.data.chat_format import jinja_chat_template, render_conversation, render_prompt
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.errors import DarkhorseError
from darkhorse.infer.engine import Engine
from darkhorse.interop.gguf import export_gguf, rope_interleave_rows
from darkhorse.interop.llama_cpp_child import LLAMA_CPP_MISSING
from darkhorse.model import Transformer

llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_MISSING)
Jinja2ChatFormatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter

LOGIT_TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 1e-1, "q8_0": 3e-1}
GREEDY_TOKENS = 40
PROMPT = "three four five six"


def load_llama(path, n_ctx: int = 256) -> llama_cpp.Llama:
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, n_threads=1, type_k=f32, type_v=f32, verbose=False)


def llama_greedy(llm: llama_cpp.Llama, prompt_ids: list[int], count: int) -> list[int]:
    tokens = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
        tokens.append(token)
        if len(tokens) == count:
            return tokens
    return tokens


def copy_with_model_config(checkpoint, out_dir, change):
    """`checkpoint` copied with `change(model_config_dict)` applied to its meta.json (weights untouched)."""
    out_dir.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (out_dir / name).write_bytes((checkpoint / name).read_bytes())
    meta = json.loads((checkpoint / "meta.json").read_text())
    change(meta["config"]["model"])
    (out_dir / "meta.json").write_text(json.dumps(meta))
    return out_dir


def check_against_darkhorse(checkpoint, gguf_file, outtype: str, routing_flips: int = 0) -> None:
    model, _, _ = load_model(checkpoint)
    tokenizer = Tokenizer.from_file(checkpoint / "tokenizer.json")
    prompt = tokenizer.encode(PROMPT)
    expected = list(Engine(model, tokenizer.vocab_size).stream(prompt, max_new_tokens=GREEDY_TOKENS))
    assert len(expected) == GREEDY_TOKENS

    llm = load_llama(gguf_file)
    assert llama_greedy(llm, prompt, GREEDY_TOKENS) == expected

    sequence = prompt + expected
    llm.reset()
    llm.eval(sequence)
    theirs = np.asarray(llm.scores[: len(sequence)])
    with torch.no_grad():
        ours = model(torch.tensor([sequence])).logits[0].numpy()
    assert theirs.shape == ours.shape
    worst_per_position = np.abs(theirs - ours).max(axis=1)
    assert (worst_per_position >= LOGIT_TOLERANCE[outtype]).sum() <= routing_flips


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_llama_gguf_matches_darkhorse(tiny_dense_checkpoint, tmp_path, outtype):
    out = export_gguf(tiny_dense_checkpoint, tmp_path / f"model-{outtype}.gguf", outtype)
    check_against_darkhorse(tiny_dense_checkpoint, out, outtype)


def test_untied_head_is_written_as_output_tensor(tiny_untied_checkpoint, tmp_path):
    out = export_gguf(tiny_untied_checkpoint, tmp_path / "untied.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" in names
    check_against_darkhorse(tiny_untied_checkpoint, out, "f32")


def test_tied_model_has_no_output_tensor_and_keeps_norms_f32(tiny_dense_checkpoint, tmp_path):
    out = export_gguf(tiny_dense_checkpoint, tmp_path / "model.gguf", "q8_0")
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in tensors
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_deepseek2_gguf_matches_darkhorse(tiny_genesis_checkpoint, tmp_path, outtype):
    out = export_gguf(tiny_genesis_checkpoint, tmp_path / f"genesis-{outtype}.gguf", outtype)
    flips = 2 if outtype in ("bf16", "q8_0") else 0
    check_against_darkhorse(tiny_genesis_checkpoint, out, outtype, routing_flips=flips)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_mixtral_style_moe_exports_as_llama_moe(tiny_mixtral_checkpoint, tmp_path, outtype):
    out = export_gguf(tiny_mixtral_checkpoint, tmp_path / f"mixtral-{outtype}.gguf", outtype)
    reader = gguf.GGUFReader(out)
    assert read_field(reader, "general.architecture") == "llama"
    assert read_field(reader, "llama.expert_count") == 4
    check_against_darkhorse(tiny_mixtral_checkpoint, out, outtype, routing_flips=2 if outtype == "q8_0" else 0)


def test_deepseek2_metadata_and_tensor_layout(tiny_genesis_checkpoint, tmp_path):
    out = export_gguf(tiny_genesis_checkpoint, tmp_path / "genesis.gguf", "f16")
    reader = gguf.GGUFReader(out)
    assert read_field(reader, "general.architecture") == "deepseek2"
    assert read_field(reader, "deepseek2.expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID
    assert read_field(reader, "deepseek2.expert_weights_norm") is True
    assert read_field(reader, "deepseek2.attention.head_count_kv") == 1
    assert read_field(reader, "deepseek2.attention.key_length") == 64 + 16  # latent + shared rope key
    assert read_field(reader, "deepseek2.attention.key_length_mla") == 32 + 16
    assert read_field(reader, "deepseek2.leading_dense_block_count") == 1
    tensors = {t.name: (tuple(int(n) for n in reversed(t.shape)), t.tensor_type) for t in reader.tensors}
    assert tensors["blk.1.ffn_gate_exps.weight"][0] == (4, 128, 128)  # [experts, out, in]
    assert tensors["blk.1.attn_k_b.weight"][0] == (4, 64, 32)  # [heads, latent, nope]
    assert tensors["blk.1.attn_v_b.weight"][0] == (4, 32, 64)  # [heads, v, latent]
    assert tensors["blk.1.exp_probs_b.bias"][1] == gguf.GGMLQuantizationType.F32
    assert tensors["blk.1.ffn_gate_inp.weight"][1] == gguf.GGMLQuantizationType.F32  # router stays exact
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors  # dense first layer
    assert not any(name.startswith("blk.2.") for name in tensors)  # the MTP module is not exported


def test_deepseek2_without_query_compression_is_refused(tiny_genesis_checkpoint, tmp_path):
    copy = copy_with_model_config(
        tiny_genesis_checkpoint, tmp_path / "no-q-lora", lambda m: m["mla"].update(q_lora_rank=0)
    )
    with pytest.raises(DarkhorseError, match="q_lora_rank > 0"):
        export_gguf(copy, tmp_path / "m.gguf", "f16")


def test_deepseek2_without_a_nope_part_is_refused(tiny_genesis_checkpoint, tmp_path):
    """All-rope q/k heads (qk_nope_head_dim 0) would abort llama.cpp: refused before anything is written."""
    copy = copy_with_model_config(
        tiny_genesis_checkpoint, tmp_path / "all-rope", lambda m: m["mla"].update(qk_nope_head_dim=0)
    )
    with pytest.raises(DarkhorseError, match="qk_nope_head_dim > 0"):
        export_gguf(copy, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


def read_field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def test_tokenizer_and_chat_template_are_embedded(tiny_dense_checkpoint, tmp_path):
    out = export_gguf(tiny_dense_checkpoint, tmp_path / "model.gguf", "f16")
    tokenizer = Tokenizer.from_file(tiny_dense_checkpoint / "tokenizer.json")
    config = json.loads((tiny_dense_checkpoint / "meta.json").read_text())["config"]["model"]
    reader = gguf.GGUFReader(out)
    assert read_field(reader, "tokenizer.ggml.model") == "gpt2"
    assert read_field(reader, "tokenizer.ggml.pre") == "qwen2"
    assert read_field(reader, "tokenizer.chat_template") == jinja_chat_template()
    assert read_field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_id
    assert read_field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    assert read_field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_id
    assert read_field(reader, "llama.rope.dimension_count") == config["dim"] // config["n_heads"]
    tokens = read_field(reader, "tokenizer.ggml.tokens")
    types = read_field(reader, "tokenizer.ggml.token_type")
    padded = -(-tokenizer.vocab_size // 64) * 64
    assert len(tokens) == len(types) == padded  # one entry per embedding row
    assert types[tokenizer.bos_id] == gguf.TokenType.CONTROL
    assert types[tokenizer.vocab_size] == gguf.TokenType.UNUSED
    assert types[tokenizer.token_to_id("one")] == gguf.TokenType.NORMAL

    # llama-cpp-python renders the embedded template exactly as darkhorse renders a prompt.
    history = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "count"},
    ]
    formatter = Jinja2ChatFormatter(read_field(reader, "tokenizer.chat_template"), eos_token="<|eos|>", bos_token="")
    assert formatter(messages=history).prompt == render_prompt(history)

    # llama.cpp's own tokenizer (from the embedded vocab, merges and `pre` regex) gives darkhorse's ids.
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    conversation = [{"role": "user", "content": "Count: 12345 apples,  don't\tstop!\n\nÜber café 東京"}]
    texts = [
        "one two three  four\n\nfive",
        "x=3.14159; y = x ** 2  # 'tis fine",
        render_prompt(conversation),
        render_conversation([*conversation, {"role": "assistant", "content": "ok 42"}]),
    ]
    for text in texts:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert ids == tokenizer.encode(text), text
        assert llm.detokenize(ids, special=True).decode("utf-8") == text


def test_rope_row_permutation_pairs_half_split_channels():
    heads, head_dim = 2, 8
    weight = torch.arange(heads * head_dim).float().unsqueeze(1)  # row index as value
    rows = rope_interleave_rows(weight, heads).squeeze(1).long().tolist()
    # Head 0: channel j pairs with j + 4 -> adjacent rows (0, 4), (1, 5), ...; head 1 likewise.
    assert rows == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_existing_output_needs_force_and_failed_export_leaves_nothing(tiny_dense_checkpoint, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(DarkhorseError, match="--force"):
        export_gguf(tiny_dense_checkpoint, out, "f16")
    assert out.read_bytes() == b"precious"

    # The weights say ffn_dim 512: fails mid-stream, after the header and early tensors are written.
    broken = copy_with_model_config(tiny_dense_checkpoint, tmp_path / "broken", lambda m: m.update(ffn_dim=640))
    with pytest.raises(DarkhorseError, match=r"gate_proj.weight has shape \(512, 256\), its config needs \(640"):
        export_gguf(broken, tmp_path / "new.gguf", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "model.gguf"]


def test_bad_inputs_are_one_line_errors(tiny_dense_checkpoint, tmp_path):
    with pytest.raises(DarkhorseError, match="outtype"):
        export_gguf(tiny_dense_checkpoint, tmp_path / "m.gguf", "q4_k")
    with pytest.raises(DarkhorseError, match="not found"):
        export_gguf(tmp_path / "missing", tmp_path / "m.gguf", "f16")
    mhc = copy_with_model_config(tiny_dense_checkpoint, tmp_path / "mhc", lambda m: m.update(residual="mhc"))
    with pytest.raises(DarkhorseError, match="hyper-connections"):
        export_gguf(mhc, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


def checkpoint_with_tokenizer(tmp_path, backend: BackendTokenizer):
    """A random tiny model saved with `backend` as its tokenizer (no darkhorse special tokens)."""
    tokenizer_file = tmp_path / "foreign-tokenizer.json"
    backend.save(str(tokenizer_file))
    cfg = ModelConfig(vocab_size=backend.get_vocab_size(), n_layers=1, dim=64, n_heads=2, n_kv_heads=1, ffn_dim=128)
    config = RunConfig(model=cfg, train=TrainConfig(seq_len=64))
    return save_model_checkpoint(tmp_path / "foreign", Transformer(cfg), config, tokenizer_file, {})


def test_foreign_gpt2_style_tokenizer_exports_without_chat_template(tmp_path):
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's own regex
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["it's 2024 and we're testing tokenizers, don't we?"] * 20, trainer=trainer)
    out = export_gguf(checkpoint_with_tokenizer(tmp_path, backend), tmp_path / "foreign.gguf", "f32")
    reader = gguf.GGUFReader(out)
    assert read_field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert "tokenizer.chat_template" not in reader.fields
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    for text in ["it's 2024, don't   we?", "Tokenizers\n\ntesting 123"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == backend.encode(text).ids


def test_pre_tokenizer_llama_cpp_does_not_know_is_refused(tmp_path):
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(["some words here"] * 5, trainer=trainers.BpeTrainer(vocab_size=60))
    with pytest.raises(DarkhorseError, match="byte-level BPE pre-tokenizer"):
        export_gguf(checkpoint_with_tokenizer(tmp_path, backend), tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


def test_export_command_writes_gguf(tiny_dense_checkpoint, tmp_path, capsys):
    from darkhorse.cli import main

    out = tmp_path / "cli.gguf"
    argv = ["export", "--checkpoint", str(tiny_dense_checkpoint), "--format", "gguf", "--outtype", "q8_0"]
    assert main([*argv, "--out", str(out)]) == 0
    assert tensor_type_of(out, "blk.0.attn_q.weight") == gguf.GGMLQuantizationType.Q8_0
    assert main([*argv, "--out", str(out)]) == 2  # exists: needs --force
    assert "--force" in capsys.readouterr().err


def tensor_type_of(path, name: str) -> gguf.GGMLQuantizationType:
    return next(gguf.GGMLQuantizationType(t.tensor_type) for t in gguf.GGUFReader(path).tensors if t.name == name)


def with_yarn(checkpoint, out_dir, mscale: float, mscale_all_dim: float):
    """The same weights under a YaRN config (x4 beyond an original context of 64 positions)."""
    model, config, _ = load_model(checkpoint)
    scaling = RopeScalingConfig(
        type="yarn", factor=4.0, original_max_seq_len=64, mscale=mscale, mscale_all_dim=mscale_all_dim
    )
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, rope_scaling=scaling))
    stretched = Transformer(config.model)
    stretched.load_state_dict(model.state_dict())
    return save_model_checkpoint(out_dir, stretched.eval(), config, checkpoint / "tokenizer.json", {"step": 0})


@pytest.mark.parametrize(
    ("fixture", "mscale_all_dim"),
    [("tiny_dense_checkpoint", 0.0), ("tiny_genesis_checkpoint", 1.0)],
)
def test_yarn_context_extension_matches(request, tmp_path, fixture, mscale_all_dim):
    """YaRN changes every position's frequencies; 100 positions also run past the original 64."""
    checkpoint = with_yarn(request.getfixturevalue(fixture), tmp_path / "yarn", 1.0, mscale_all_dim)
    out = export_gguf(checkpoint, tmp_path / "yarn.gguf", "f32")
    model, _, _ = load_model(checkpoint)
    sequence = list(range(20, 120))
    llm = load_llama(out)
    llm.eval(sequence)
    theirs = np.asarray(llm.scores[: len(sequence)])
    with torch.no_grad():
        ours = model(torch.tensor([sequence])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < LOGIT_TOLERANCE["f32"]


def test_yarn_settings_llama_cpp_cannot_compute_are_refused(tiny_dense_checkpoint, tmp_path):
    checkpoint = with_yarn(tiny_dense_checkpoint, tmp_path / "yarn", 1.0, 1.0)
    with pytest.raises(DarkhorseError, match="mscale=1 and mscale_all_dim=0"):
        export_gguf(checkpoint, tmp_path / "yarn.gguf", "f32")


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"scoring": "sigmoid"}, "scoring=sigmoid"), ({"capacity_factor": 1.25}, "drops tokens")],
)
def test_moe_settings_llama_cpp_cannot_run_are_refused(tiny_mixtral_checkpoint, tmp_path, changes, message):
    checkpoint = copy_with_model_config(
        tiny_mixtral_checkpoint, tmp_path / "changed", lambda m: m["moe"].update(changes)
    )
    with pytest.raises(DarkhorseError, match=message):
        export_gguf(checkpoint, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(
    ("extra", "arch"),
    [
        ({"attention_bias": True}, "qwen2"),
        ({"qk_norm": True}, "qwen3"),
        ({"qk_norm": True, "tie_embeddings": False}, "qwen3"),  # tiny-cpu's architecture since issue 17
    ],
)
def test_qwen_style_attention_exports_as_qwen_architectures(tiny_dense_checkpoint, tmp_path, extra, arch):
    """q/k/v biases and q/k norms (imported Qwen2/Qwen3 models) with random, non-trivial values."""
    vocab = Tokenizer.from_file(tiny_dense_checkpoint / "tokenizer.json").vocab_size
    cfg = ModelConfig(vocab_size=vocab, n_layers=2, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256, **extra)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("_norm.weight", ".bias")):
                param.copy_(1.0 + 0.5 * torch.randn_like(param))
    config = RunConfig(model=cfg, train=TrainConfig(seq_len=64))
    tokenizer_file = tiny_dense_checkpoint / "tokenizer.json"
    checkpoint = save_model_checkpoint(tmp_path / arch, model, config, tokenizer_file, {})
    out = export_gguf(checkpoint, tmp_path / f"{arch}.gguf", "f32")
    assert read_field(gguf.GGUFReader(out), "general.architecture") == arch
    sequence = list(range(20, 84))
    llm = load_llama(out)
    llm.eval(sequence)
    with torch.no_grad():
        ours = model(torch.tensor([sequence])).logits[0].numpy()
    assert np.abs(np.asarray(llm.scores[: len(sequence)]) - ours).max() < LOGIT_TOLERANCE["f32"]


def test_tensors_the_gguf_cannot_hold_are_named(tiny_dense_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    checkpoint = copy_with_model_config(tiny_dense_checkpoint, tmp_path / "extra", lambda m: None)
    weights = load_file(checkpoint / "model.safetensors")
    weights["layers.0.attn.mystery.weight"] = torch.ones(4)
    save_file(weights, checkpoint / "model.safetensors")
    with pytest.raises(DarkhorseError, match=r"no place for layers\.0\.attn\.mystery\.weight"):
        export_gguf(checkpoint, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(
    "moe",
    [
        {"n_groups": 2, "topk_groups": 1},
        {"n_groups": 2, "topk_groups": 2},
        {"domain_routing": "isolated", "n_domains": 2, "domain_experts": [3, 1]},
    ],
    ids=["top-1-of-2", "top-2-of-2", "unequal-domain-groups"],
)
def test_deepseek2_group_limited_routing_matches(tiny_genesis_checkpoint, tmp_path, moe):
    """Experts in 2 groups of 2: top-1 group routing, and top-2 of 2 (no limit, written as 1 group); domains
    owning 3 and 1 experts: 4 groups of one, 2 of them kept (no limit either)."""
    checkpoint = copy_with_model_config(tiny_genesis_checkpoint, tmp_path / "grouped", lambda m: m["moe"].update(moe))
    out = export_gguf(checkpoint, tmp_path / "grouped.gguf", "f32")
    check_against_darkhorse(checkpoint, out, "f32")


def test_deepseek2_gguf_of_a_group_context_routes_each_token_by_its_own_scores(
    tiny_genesis_checkpoint, tmp_path, caplog
):
    """model.moe.group_context is darkhorse inference only: the GGUF drops its tensors, says so, and llama.cpp
    computes what our model computes without it (2 domain groups of 2 experts, top-1 group)."""
    model, config, meta = load_model(tiny_genesis_checkpoint)
    tokenizer = tiny_genesis_checkpoint / "tokenizer.json"
    isolated = {}
    for context in (False, True):
        moe = dataclasses.replace(config.model.moe, domain_routing="isolated", n_domains=2, group_context=context)
        changed = dataclasses.replace(config, model=dataclasses.replace(config.model, moe=moe))
        variant = Transformer(changed.model)
        variant.load_state_dict(model.state_dict(), strict=False)
        with torch.no_grad():
            for name, weight in variant.named_parameters():
                if name.endswith("group_context.weight"):
                    weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        isolated[context] = save_model_checkpoint(tmp_path / f"context-{context}", variant, changed, tokenizer, meta)
    with caplog.at_level("WARNING", logger="darkhorse"):
        out = export_gguf(isolated[True], tmp_path / "context.gguf", "f32")
    assert "darkhorse inference only" in caplog.text
    check_against_darkhorse(isolated[False], out, "f32")
