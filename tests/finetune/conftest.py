"""Tiny bases for the fine-tuning tests: Hugging Face models that transformers builds from a config (with
a small Llama-3-style tokenizer and chat template), and chat data in the shape the seed workflow uses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import TINY_CYCLE, write_foreign_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)  # fmt: skip
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**SHAPE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", SHAPE),
}


def build_hf_base(folder, family: str, seed: int = 0):
    """A random transformers model saved to `folder` with the foreign (Llama-3-style) tokenizer."""
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    model.save_pretrained(str(folder))
    tokenizer_dir = folder.parent / f"{folder.name}-tokenizer"
    write_foreign_tokenizer(tokenizer_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    return folder


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
