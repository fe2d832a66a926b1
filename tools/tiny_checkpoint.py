"""Write an untrained two-layer checkpoint for the image smoke test: it exercises loading, the chat
template and the server in seconds (its replies are noise, which is all a smoke test needs).

    python tools/tiny_checkpoint.py OUT_DIR
"""

import sys
from pathlib import Path

import torch

from darkhorse.checkpoint import save_model_checkpoint
from darkhorse.config import ModelConfig, RunConfig, TrainConfig
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.model import Transformer


def main(out_dir: Path) -> None:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(["a tiny model for a smoke test"] * 4, vocab_size=300)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_file = tokenizer.save(out_dir.parent / "tiny-tokenizer.json")
    model = ModelConfig(vocab_size=tokenizer.vocab_size, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128)
    config = RunConfig(name="tiny-smoke", model=model, train=TrainConfig(seq_len=64))
    save_model_checkpoint(out_dir, Transformer(model).eval(), config, tokenizer_file, {"step": 0})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
