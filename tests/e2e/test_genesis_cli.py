"""genesis-tiny goes through the same CLI as the dense model: prepare, train, resume exactly, generate."""

from __future__ import annotations

import json
from pathlib import Path

from darkhorse.cli import main

SHORT = ["train.seq_len=32", "train.batch_size=4", "train.eval_interval=0", "train.schedule=constant",
         "train.warmup_steps=0", "train.save_interval=3", "model.n_layers=2"]  # fmt: skip


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, tuple]:
    return {r["step"]: (r["loss"], r["mtp_loss"], r["moe/L1/load_max_over_mean"]) for r in records(run_dir)
            if "loss" in r}  # fmt: skip


def test_genesis_tiny_trains_resumes_exactly_and_generates(tmp_path, capsys):
    topics = {"code": "def add(a, b): return a + b  # sums {i}", "math": "the derivative of x^{i} is {i} x^{j}",
              "legal": "pursuant to section {i}.{j} of the agreement the parties"}  # fmt: skip
    lines = [json.dumps({"domain": d, "text": t.format(i=i, j=i + 1)}) for i in range(150) for d, t in topics.items()]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    prepared = tmp_path / "prepared"
    assert main(["prepare", "--input", str(tmp_path / "corpus.jsonl"), "--out", str(prepared), "--vocab-size", "400",
                 "--quiet"]) == 0  # fmt: skip

    train = ["train", "--preset", "genesis-tiny", *SHORT, "--data", str(prepared), "--log-interval", "1", "--quiet"]
    assert main([*train, "--out", str(tmp_path / "run"), "--max-steps", "3"]) == 0
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "6", "--quiet"]) == 0
    assert main([*train, "--out", str(tmp_path / "straight"), "--max-steps", "6"]) == 0
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
    last = records(tmp_path / "straight")[-1]
    assert last["moe/load_max"] >= 1.0 >= last["moe/load_min"]
    for report in ("expert_utilization.png", "domain_routing.png", "domain_routing.json"):
        assert (tmp_path / "straight" / report).exists(), report

    capsys.readouterr()
    checkpoint = str(tmp_path / "run" / "final")
    assert main(["generate", "--checkpoint", checkpoint, "--prompt", "the derivative", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
