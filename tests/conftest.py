"""Shared fixtures. Tests build everything they need locally: no hub, no network."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # tests run in parallel workers on 2 cores; one thread each avoids thrashing


def pytest_configure(config):
    """Child processes (CLI tests, llama.cpp workers) import this checkout's darkhorse, whatever is installed.

    `make test` sets DARKHORSE_REQUIRE_GGUF_CHECK: there the GGUF tests must run, not skip."""
    import importlib.util
    import os
    from pathlib import Path

    source = str(Path(__file__).resolve().parents[1] / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
    if os.environ.get("DARKHORSE_REQUIRE_GGUF_CHECK") and importlib.util.find_spec("llama_cpp") is None:
        raise pytest.UsageError("llama-cpp-python is not installed but the GGUF tests must run: make install-test")


# -- a tiny trained dense checkpoint (interop tests) ----------------------------------------------

TINY_CYCLE = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen",
    "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
    "red", "orange", "yellow", "green", "blue", "indigo", "violet",
)  # fmt: skip


def _tiny_corpus() -> list[str]:
    """Windows of one fixed word cycle (every word has one successor: confident, tie-free greedy
    decoding after a few dozen steps) plus chat turns "after one?" -> "two".

    The chat turns repeat 8 times: seen once each, 40 steps left replies empty or one character on some
    CPUs' rounding, and the chat, eval and page tests need a model that answers in words."""
    from darkhorse.data.chat_format import render_conversation

    cycle = list(TINY_CYCLE) * 3
    texts = [" ".join(cycle[k : k + 20 + k % 7]) + "." for k in range(len(TINY_CYCLE)) for _ in range(6)]
    texts += [
        render_conversation([{"role": "user", "content": f"after {w}?"}, {"role": "assistant", "content": w2}])
        for w, w2 in zip(TINY_CYCLE, TINY_CYCLE[1:], strict=False)
    ] * 8
    return texts


def train_tiny_checkpoint(out_dir, *, steps: int = 40, seed: int = 0, **model):
    """Train a 2-layer model (dim 256, so K-quants apply) on `_tiny_corpus` and save a checkpoint.

    `model` overrides ModelConfig fields, e.g. the MLA + MoE + MTP settings of `tiny_genesis_checkpoint`."""
    from darkhorse.checkpoint import save_model_checkpoint
    from darkhorse.config import ModelConfig, RunConfig, TrainConfig
    from darkhorse.data.tokenizer import Tokenizer
    from darkhorse.model import Transformer

    torch.manual_seed(seed)
    texts = _tiny_corpus()
    tokenizer = Tokenizer.train(texts, vocab_size=400)
    tokenizer_file = tokenizer.save(out_dir.parent / f"{out_dir.name}-tokenizer.json")
    stream = torch.tensor([i for text in texts for i in tokenizer.encode(text)])
    shape = dict(
        vocab_size=tokenizer.vocab_size, n_layers=2, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=512,
        max_seq_len=256,
    )  # fmt: skip
    model_config = ModelConfig(**{**shape, **model})
    config = RunConfig(name="tiny-gguf", model=model_config, train=TrainConfig(seq_len=64, batch_size=8))
    model = Transformer(model_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        starts = torch.randint(0, len(stream) - 65, (8,))
        batch = torch.stack([stream[s : s + 65] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:], mtp_weight=0.3).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_optimizer_step(step)
    save_model_checkpoint(out_dir, model.eval(), config, tokenizer_file, {"step": steps, "loss": loss.item()})
    return out_dir


@pytest.fixture(scope="session")
def tiny_words() -> tuple[str, ...]:
    """The words the tiny checkpoints were trained on (text they model well)."""
    return TINY_CYCLE


@pytest.fixture(scope="session")
def tiny_dense_checkpoint(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("tiny-dense") / "final", steps=120)


# -- prepared data dirs written directly in the on-disk format (trainer tests) ----------------------


def write_prepared_dir(
    path, *, vocab_size: int = 64, train_tokens: int = 4096, val_tokens: int = 1024, seed: int = 0,
    tokenizer_sha256: str = "test-tokenizer", domains: bool = False, period: int = 17, loss_mask: bool = False,
):  # fmt: skip
    """A prepared dir whose tokens repeat a fixed random cycle of `period` ids (easy to learn).

    With `loss_mask`, the first third of each cycle is context only (mask 0), like a chat prompt."""
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    cycle = rng.integers(0, vocab_size, size=period)
    path.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, count in (("train", train_tokens), ("val", val_tokens)):
        tokens = np.resize(cycle, count).astype("<u4")
        tokens.tofile(path / f"{split}.bin")
        splits[split] = {"tokens": count, "documents": 1, "bytes": 3 * count}
        if domains:
            (np.arange(count) % 3).astype("u1").tofile(path / f"{split}.domains.bin")
        if loss_mask:
            (np.arange(count) % period >= period // 3).astype("u1").tofile(path / f"{split}.mask.bin")
    meta = {
        "format": "darkhorse-prepared-v1",
        "vocab_size": vocab_size,
        "tokenizer_sha256": tokenizer_sha256,
        "domains": ["a", "b", "c"] if domains else [],
        "loss_mask": loss_mask,
        "splits": splits,
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.fixture
def prepared_dir(tmp_path):
    return write_prepared_dir(tmp_path / "prepared")


@pytest.fixture(scope="module")
def module_prepared_dir(tmp_path_factory):
    """`prepared_dir` shared by the tests of one module (for module-scoped fixtures that train on it)."""
    return write_prepared_dir(tmp_path_factory.mktemp("data") / "prepared")


@pytest.fixture
def make_prepared():
    """The `write_prepared_dir` factory, for tests that need several or unusual dirs."""
    return write_prepared_dir


@pytest.fixture(scope="session")
def tiny_untied_checkpoint(tiny_dense_checkpoint, tmp_path_factory):
    """The trained dense model with its head untied (a copy of the embedding): same outputs, own tensor."""
    import dataclasses

    from darkhorse.checkpoint import load_model, save_model_checkpoint
    from darkhorse.model import Transformer

    tied, config, meta = load_model(tiny_dense_checkpoint)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, tie_embeddings=False))
    untied = Transformer(config.model)
    state = tied.state_dict()
    state["lm_head.weight"] = state["embed.weight"].clone()
    untied.load_state_dict(state)
    out = tmp_path_factory.mktemp("tiny-untied") / "final"
    return save_model_checkpoint(out, untied, config, tiny_dense_checkpoint / "tokenizer.json", {"step": meta["step"]})


def train_tiny_genesis(out_dir):
    """MLA (compressed queries) + sigmoid-routed MoE with a shared expert + one MTP module."""
    from darkhorse.config import MLAConfig, MoEConfig

    return train_tiny_checkpoint(
        out_dir, seed=2, dim=128, ffn_dim=256, attention="mla", ffn="moe", mtp_depth=1, norm_eps=1e-6,
        mla=MLAConfig(q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
        moe=MoEConfig(n_routed_experts=4, experts_per_token=2, n_shared_experts=1, moe_intermediate_size=128),
    )  # fmt: skip


def train_tiny_mixtral(out_dir):
    """GQA + softmax-routed MoE in every layer, no shared expert, no selection bias (Mixtral's shape)."""
    from darkhorse.config import MoEConfig

    moe = MoEConfig(
        n_routed_experts=4, experts_per_token=2, n_shared_experts=0, moe_intermediate_size=128, scoring="softmax",
        first_k_dense=0, bias_update_rate=0.0,
    )  # fmt: skip
    return train_tiny_checkpoint(out_dir, seed=3, dim=128, ffn="moe", moe=moe)


@pytest.fixture(scope="session")
def tiny_genesis_checkpoint(tmp_path_factory):
    return train_tiny_genesis(tmp_path_factory.mktemp("tiny-genesis") / "final")


@pytest.fixture(scope="session")
def tiny_mixtral_checkpoint(tmp_path_factory):
    return train_tiny_mixtral(tmp_path_factory.mktemp("tiny-mixtral") / "final")


# -- a foreign (Llama-3-style) tokenizer, as an imported model brings it ----------------------------

FOREIGN_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
FOREIGN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
    "\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def write_foreign_tokenizer(folder, *, settings: bool = True):
    """A byte-level BPE with Llama 3's special tokens (none of darkhorse's) as folder/tokenizer.json; with
    `settings`, a tokenizer_config.json declaring bos/eos (AddedToken dict form) and a chat template."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(FOREIGN_SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([" ".join(TINY_CYCLE)] * 20, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    if settings:
        config = {
            "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True},
            "eos_token": "<|eot_id|>",
            "chat_template": FOREIGN_TEMPLATE,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder / "tokenizer.json"


@pytest.fixture
def foreign_tokenizer():
    """The `write_foreign_tokenizer` factory."""
    return write_foreign_tokenizer


@pytest.fixture
def llama_dir():
    """Factory: a random transformers LlamaForCausalLM saved in a folder with the Llama-3-style tokenizer and
    chat template of `write_foreign_tokenizer` (an HF model as it comes from the hub); returns the model."""
    transformers = pytest.importorskip("transformers")

    def build(folder):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config).eval()
        model.save_pretrained(str(folder))
        write_foreign_tokenizer(folder)
        return model

    return build
