"""`darkhorse train` through the installed console script: smoke, refusals, SIGTERM and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from darkhorse.cli import main
from darkhorse.config import load_run_config
from darkhorse.train.trainer import train

DARKHORSE = [sys.executable, "-m", "darkhorse"]  # this checkout (conftest puts its src/ on PYTHONPATH)
SMALL = ["model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
         "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4", "train.eval_interval=0",
         "train.schedule=constant", "train.warmup_steps=0"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count as this process: bit-identical sums


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DARKHORSE, *args], capture_output=True, text=True, timeout=120, env=ENV)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow  # two console-script processes: torch's import dominates on loaded cores
def test_train_smoke_plain_logs_and_refuses_to_clobber(tmp_path, prepared_dir):
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "tiny-cpu", *SMALL, "--data", str(prepared_dir), "--out", str(run_dir)]
    result = run_cli(*args, "--max-steps", "4", "--log-interval", "2")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all(" tok/s | MFU " in line and " | ETA " in line for line in lines)
    assert (run_dir / "final" / "model.safetensors").exists() and (run_dir / "loss.png").exists()

    again = run_cli(*args, "--max-steps", "4")
    assert again.returncode == 2
    assert again.stderr.startswith("darkhorse: error: ") and "--resume" in again.stderr
    assert "Traceback" not in again.stderr


def test_resume_from_the_command_line_keeps_the_config(tmp_path, prepared_dir, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "tiny-cpu", *SMALL, "--data", str(prepared_dir), "--out", str(run_dir)]
    assert main([*args, "--max-steps", "2", "--log-interval", "2", "--quiet"]) == 0
    # the override lands on --resume's optional CKPT_DIR; it still counts as an override
    assert main(["train", "--out", str(run_dir), "--resume", "train.max_steps=4", "--quiet"]) == 0
    assert list(losses(run_dir)) == [2, 4]
    capsys.readouterr()
    assert main(["train", "--out", str(run_dir), "--resume", "train.lr=1"]) == 2
    assert "train.lr" in capsys.readouterr().err


def test_bad_input_is_one_line_error(tmp_path, prepared_dir, capsys):
    cases = [
        (["--preset", "tiny-cpu", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], "nope"),
        (["--preset", "tiny-cpu", "train.lr_max=1", "--data", str(prepared_dir), "--out", "x"], "train.lr"),
        (["--preset", "tiny-cpu", "--out", str(tmp_path / "r")], "--data"),
        (["--data", str(prepared_dir), "--out", str(tmp_path / "r")], "--preset"),
        (["--out", str(tmp_path / "empty"), "--resume"], "no checkpoint"),
        (["--preset", "tiny-cpu", "train.kernels=liger", "--data", str(prepared_dir), "--out", str(tmp_path / "k")],
         "train.kernels=liger needs CUDA"),
        (["--preset", "tiny-cpu", "train.compile=sometimes", "--data", str(prepared_dir), "--out", "x"],
         "train.compile must be one of"),
    ]  # fmt: skip
    for args, expected in cases:
        assert main(["train", *args]) == 2
        error = capsys.readouterr().err
        assert error.startswith("darkhorse: error: ") and expected in error and error.count("\n") == 1


@pytest.mark.slow  # two console-script processes plus a reference run
def test_sigterm_saves_and_resume_repeats_the_uninterrupted_losses(tmp_path, prepared_dir):
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "tiny-cpu", *SMALL, "--data", str(prepared_dir), "--out", str(run_dir)]
    process = subprocess.Popen(
        [*DARKHORSE, *args, "--max-steps", "100000", "--log-interval", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    for line in process.stdout:
        if line.startswith("step 3/"):
            process.send_signal(signal.SIGTERM)
            break
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr  # 143: saved, then exit as shells expect
    assert "stopped by SIGTERM" in stdout and "--resume" in stdout
    interrupted_at = max(losses(run_dir))
    assert (run_dir / f"step-{interrupted_at:06d}" / "trainer_state.pt").exists()

    end = interrupted_at + 3
    resumed = run_cli("train", "--out", str(run_dir), "--resume", "--max-steps", str(end), "--quiet")
    assert resumed.returncode == 0, resumed.stderr

    config = load_run_config("tiny-cpu", overrides=[*SMALL, f"train.max_steps={end}", "train.log_interval=1"])
    train(config, [(prepared_dir, 1.0)], tmp_path / "reference", verbose=False)
    assert losses(run_dir) == losses(tmp_path / "reference")
