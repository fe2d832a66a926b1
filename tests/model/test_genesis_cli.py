"""genesis-tiny goes through the same CLI as the dense model: prepare, train, resume exactly, generate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DARKHORSE = shutil.which("darkhorse") or str(Path(sys.executable).parent / "darkhorse")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SHORT = ["train.seq_len=32", "train.batch_size=4", "train.eval_interval=0", "train.schedule=constant",
         "train.warmup_steps=0", "train.save_interval=3"]  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DARKHORSE, *args], capture_output=True, text=True, timeout=300, env=ENV)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_genesis_tiny_trains_resumes_exactly_and_generates(tmp_path):
    topics = {"code": "def add(a, b): return a + b  # sums {i}", "math": "the derivative of x^{i} is {i} x^{j}",
              "legal": "pursuant to section {i}.{j} of the agreement the parties"}  # fmt: skip
    lines = [json.dumps({"domain": d, "text": t.format(i=i, j=i + 1)}) for i in range(150) for d, t in topics.items()]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    prepared = tmp_path / "prepared"
    result = run_cli("prepare", "--input", str(tmp_path / "corpus.jsonl"), "--out", str(prepared),
                     "--vocab-size", "400", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr

    train = ["train", "--preset", "genesis-tiny", *SHORT, "--data", str(prepared), "--log-interval", "1", "--quiet"]
    first = run_cli(*train, "--out", str(tmp_path / "run"), "--max-steps", "3")
    assert first.returncode == 0, first.stderr
    resumed = run_cli("train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "6", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    straight = run_cli(*train, "--out", str(tmp_path / "straight"), "--max-steps", "6")
    assert straight.returncode == 0, straight.stderr

    def losses(run):
        return {r["step"]: (r["loss"], r["mtp_loss"], r["moe/L1/load_max_over_mean"]) for r in records(run)
                if "loss" in r}  # fmt: skip

    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
    last = [r for r in records(tmp_path / "straight") if "loss" in r][-1]
    assert last["moe/load_max"] >= 1.0 and "mtp_loss" in last
    for report in ("expert_utilization.png", "domain_routing.png", "domain_routing.json"):
        assert (tmp_path / "straight" / report).exists(), report

    generated = run_cli("generate", "--checkpoint", str(tmp_path / "run" / "final"), "--prompt", "the derivative",
                        "--max-new-tokens", "8")  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip()
