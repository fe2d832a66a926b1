"""A stored loss curve per architecture guards refactors: the same seed and data must give the same losses.

Each run trains a preset for 30 steps on the conftest corpus of a repeating token cycle (with domain
tags, so the Genesis run exercises routing statistics too) and compares every logged loss with
tests/assets/loss_trajectories.json. Losses are compared to 3e-3 relative: tighter than any real change
to the model, data order, optimizer or schedule moves them (those move step 2 already by percent), and
loose enough for summation-order differences between CPUs (AVX2 vs AVX-512 kernels): a change of rounding
alone (the chunked head loss against the whole-logit one) moved 30 Muon steps by up to 1.1e-3.

To record the curves again after a change that is meant to move them, run
    DARKHORSE_RECORD_TRAJECTORIES=1 pytest tests/train/test_loss_trajectory.py
and say why in the commit.

The stored curves follow whatever the presets say; `test_default_recipe_stays_under_the_bound_the_old_one_misses`
guards the recipe itself (issue 17): tiny-cpu's defaults must keep their final loss under RECIPE_BOUND,
which the recipe they replaced (OLD_RECIPE, checked in the same test) does not reach.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from darkhorse.config import load_run_config
from darkhorse.train.trainer import train

ASSET = Path(__file__).resolve().parents[1] / "assets" / "loss_trajectories.json"
STEPS = 30
RUNS = {
    "tiny-cpu": ["model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128"],
    "genesis-tiny": ["model.n_layers=2", "model.moe.n_routed_experts=4"],
    # the forge presets' recipe (Muon + AdamW, WSD on Llama blocks) at tiny-cpu's test shape
    "forge-nano": [
        "model.n_layers=2",
        "model.dim=64",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.ffn_dim=128",
        "train.dtype=fp32",
        "train.grad_accum=1",
    ],  # fmt: skip
}
COMMON = [
    f"train.max_steps={STEPS}", "model.vocab_size=64", "model.max_seq_len=64", "train.seq_len=32",
    "train.batch_size=4", "train.warmup_steps=5", "train.log_interval=1", "train.eval_interval=0",
    "train.save_interval=0", "train.seed=1234",
    "train.muon_precision=bf16",  # the curves were recorded so; auto picks fp32 on CPUs without native bf16
]  # fmt: skip


# tiny-cpu's recipe before issue 17, and a loss at step 30 between its (0.88) and today's default's (0.42)
OLD_RECIPE = ["train.recipe=classic"]
RECIPE_BOUND = 0.6


def run_losses(preset: str, data_dir: Path, out_dir: Path, extra: list[str] = ()) -> list[float]:
    config = load_run_config(preset, overrides=[*RUNS[preset], *COMMON, *extra])
    train(config, [(data_dir, 1.0)], out_dir, verbose=False)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("preset", sorted(RUNS))
def test_loss_trajectory_matches_the_stored_curve(preset, tmp_path, make_prepared):
    data_dir = make_prepared(tmp_path / "data", domains=True, loss_mask=True)
    curve = run_losses(preset, data_dir, tmp_path / "run")
    assert len(curve) == STEPS
    stored = json.loads(ASSET.read_text()) if ASSET.exists() else {}
    if os.environ.get("DARKHORSE_RECORD_TRAJECTORIES"):
        stored[preset] = curve
        ASSET.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
    assert curve == pytest.approx(stored[preset], rel=3e-3)


@pytest.mark.slow
def test_default_recipe_stays_under_the_bound_the_old_one_misses(tmp_path, make_prepared):
    data_dir = make_prepared(tmp_path / "data", domains=True, loss_mask=True)
    default = run_losses("tiny-cpu", data_dir, tmp_path / "default")[-1]
    old = run_losses("tiny-cpu", data_dir, tmp_path / "old", OLD_RECIPE)[-1]
    assert default < RECIPE_BOUND < old
