"""`train --init-from`: an imported Hugging Face model (foreign tokenizer and chat template) fine-tunes,
resumes, generates and chats through the console script like a native checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from darkhorse.cli import main
from darkhorse.train.trainer import train

DARKHORSE = [sys.executable, "-m", "darkhorse"]  # this checkout (conftest puts its src/ on PYTHONPATH)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = ["train.seq_len=32", "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=0", "train.schedule=constant",
         "train.eval_interval=0", "train.save_interval=0", "--log-interval", "1"]  # fmt: skip


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([*DARKHORSE, *args], capture_output=True, text=True, timeout=180, env=ENV, input=stdin)
    assert result.returncode == 0, result.stderr
    return result


def tiny_llama(folder: Path, foreign_tokenizer) -> Path:
    """A random LlamaForCausalLM saved by transformers, with a Llama-3-style tokenizer and chat template."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    foreign_tokenizer(folder)
    return folder


WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]


def corpus(path: Path) -> Path:
    """Paragraphs of one fixed word cycle: every word has one successor, so a few steps lower the loss."""
    words = WORDS * 4
    path.write_text("\n\n".join(" ".join(words[k : k + 24]) for k in range(len(WORDS))) + "\n")
    return path


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow  # seven console-script processes, each importing torch
def test_imported_model_fine_tunes_resumes_generates_and_chats(tmp_path, foreign_tokenizer):
    hf = tiny_llama(tmp_path / "hf", foreign_tokenizer)
    imported, data, run = tmp_path / "imported", tmp_path / "data", tmp_path / "run"
    run_cli("import", str(hf), "--out", str(imported))
    text, tokenizer = corpus(tmp_path / "words.txt"), imported / "tokenizer.json"
    run_cli("prepare", "--input", str(text), "--tokenizer", str(tokenizer), "--out", str(data), "--val-fraction", "0")

    run_cli("train", "--init-from", str(imported), "--data", str(data), "--out", str(run), "--max-steps", "6", *TRAIN)
    first = losses(run)
    assert list(first) == [1, 2, 3, 4, 5, 6] and all(torch.isfinite(torch.tensor(list(first.values()))))
    assert first[6] < first[1]  # step 1's loss is the imported weights' own, before any update
    meta = json.loads((run / "final" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["init_from"] == str(imported.resolve())
    assert meta["config"]["model"]["vocab_size"] == 320 and (run / "final" / "tokenizer_config.json").exists()

    run_cli("train", "--out", str(run), "--resume", "--max-steps", "9")
    resumed = losses(run)
    assert list(resumed) == list(range(1, 10)) and {k: resumed[k] for k in first} == first
    assert json.loads((run / "final" / "meta.json").read_text())["init_from"] == str(imported.resolve())

    generated = run_cli("generate", "--checkpoint", str(run / "final"), "--prompt", "one two", "--max-new-tokens", "6")
    assert generated.stdout.strip()
    chat = run_cli("chat", "--checkpoint", str(run / "final"), "--max-new-tokens", "6", stdin="one two?\n")
    assert chat.stdout.startswith("assistant> ") and "Traceback" not in chat.stderr


def test_init_from_refuses_data_of_another_tokenizer(tmp_path, foreign_tokenizer, make_prepared):
    from darkhorse.config import load_run_config
    from darkhorse.errors import DarkhorseError
    from darkhorse.interop.hf_import import import_hf

    imported = import_hf(tiny_llama(tmp_path / "hf", foreign_tokenizer), tmp_path / "imported")
    other = make_prepared(tmp_path / "other", vocab_size=64)
    config = load_run_config(overrides=["train.seq_len=32", "train.max_steps=1"])
    with pytest.raises(DarkhorseError, match=r"prepare it with `darkhorse prepare --tokenizer .*imported/tokenizer"):
        train(config, [(other, 1.0)], tmp_path / "run", init_from=imported, verbose=False)
    with pytest.raises(DarkhorseError, match="--resume and --init-from contradict"):
        train(config, [(other, 1.0)], tmp_path / "run", resume=True, init_from=imported, verbose=False)
    assert not (tmp_path / "run" / "final").exists()


def test_init_from_refuses_model_overrides_and_needs_a_checkpoint(tmp_path, prepared_dir, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--init-from", str(tmp_path), "--data", str(prepared_dir), "--out", out, "model.dim=8"]) == 2
    assert "model.dim=8: with --init-from the model comes from" in capsys.readouterr().err
    assert main(["train", "--init-from", str(tmp_path / "none"), "--data", str(prepared_dir), "--out", out]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
