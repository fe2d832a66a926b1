"""`generate`, `chat` and bare `darkhorse --prompt` through the console script on a tiny checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from darkhorse.checkpoint import save_model_checkpoint
from darkhorse.config import load_run_config
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.model import Transformer

DARKHORSE = [sys.executable, "-m", "darkhorse"]  # this checkout (conftest puts its src/ on PYTHONPATH)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A cwd holding runs/tiny/final: a random tiny model with a small trained tokenizer."""
    root = tmp_path_factory.mktemp("inference")
    texts = [f"The number {i} follows {i - 1}. Héllo wörld, ünïcode €{i}." for i in range(300)]
    tokenizer = Tokenizer.train(texts, vocab_size=400)
    tokenizer_file = tokenizer.save(root / "tokenizer.json")
    config = load_run_config(
        "tiny-cpu", overrides=[f"model.vocab_size={tokenizer.vocab_size}", "model.n_layers=1", "model.dim=96"]
    )
    torch.manual_seed(0)
    model = Transformer(config.model)
    save_model_checkpoint(root / "runs" / "tiny" / "final", model, config, tokenizer_file, {"step": 0})
    return root


def run_cli(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*DARKHORSE, *args], capture_output=True, text=True, cwd=cwd, input=stdin, timeout=120)


@pytest.mark.slow  # CLI subprocesses: each starts Python and imports torch
def test_greedy_generate_is_deterministic(workdir):
    args = ("generate", "--checkpoint", "runs/tiny/final", "--prompt", "The number 7", "--max-new-tokens", "12")
    first, second = run_cli(*args, cwd=workdir), run_cli(*args, cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()


@pytest.mark.slow  # CLI subprocesses: each starts Python and imports torch
def test_sampled_generate_reproducible_with_seed(workdir):
    args = (
        "generate",
        "--checkpoint",
        "runs/tiny/final",
        "--prompt",
        "Héllo",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
        "--repetition-penalty",
        "1.1",
        "--seed",
        "3",
        "--max-new-tokens",
        "10",
    )
    assert run_cli(*args, cwd=workdir).stdout == run_cli(*args, cwd=workdir).stdout


@pytest.mark.slow  # CLI subprocesses: each starts Python and imports torch
def test_bare_prompt_uses_newest_final_checkpoint(workdir):
    result = run_cli("--prompt", "The number 7", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "runs/tiny/final" in result.stderr


def test_bad_checkpoint_and_options_are_one_line_errors(workdir, tmp_path):
    missing = run_cli("generate", "--checkpoint", str(tmp_path), "--prompt", "x", cwd=workdir)
    assert missing.returncode == 2 and "not a darkhorse checkpoint" in missing.stderr
    bad = run_cli("generate", "--checkpoint", "runs/tiny/final", "--prompt", "x", "--top-p", "0", cwd=workdir)
    assert bad.returncode == 2 and "--top-p" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # CLI subprocesses: each starts Python and imports torch
def test_bare_prompt_with_params_picks_a_run_of_that_preset(workdir):
    found = run_cli("--preset", "tiny-cpu", "--prompt", "The number 7", cwd=workdir)
    assert found.returncode == 0 and "runs/tiny/final" in found.stderr, found.stderr
    missing = run_cli("--params", "1b", "--prompt", "x", cwd=workdir)  # the seed's spelling: not "invalid choice"
    assert missing.returncode == 2 and "invalid choice" not in missing.stderr
    assert missing.stderr.startswith("darkhorse: error: no run of preset 1b under ./runs/*/final; train one with")
    alone = run_cli("--params", "1b", cwd=workdir)
    assert alone.returncode == 2 and "needs --prompt" in alone.stderr
