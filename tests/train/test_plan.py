"""Sizing a layout per device (train/plan.py), as `params`, `train` and docs/scale.md use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from darkhorse.cli import main
from darkhorse.config import load_run_config
from darkhorse.errors import DarkhorseError
from darkhorse.train import trainer as trainer_module
from darkhorse.train.memory import GIB
from darkhorse.train.plan import Layout, markdown, parse_bytes, plan_layout
from darkhorse.train.trainer import train

SMALL = [
    "model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4", "train.log_interval=1",
    "train.eval_interval=0", "train.save_interval=0",
]  # fmt: skip
MOE = ["model.ffn=moe", "model.moe.n_routed_experts=8", "model.moe.first_k_dense=0"]


def test_fsdp_shards_weights_gradients_and_optimizer_state_by_the_world_size():
    config = load_run_config("tiny-cpu", overrides=SMALL)
    alone = plan_layout(config, Layout())
    ddp, fsdp = plan_layout(config, Layout(4, "ddp")), plan_layout(config, Layout(4, "fsdp"))
    assert (ddp.weights, ddp.optimizer, ddp.activations) == (alone.weights, alone.optimizer, alone.activations)
    assert fsdp.weights == alone.weights // 4 and fsdp.optimizer == alone.optimizer // 4
    assert fsdp.gathered > 0 and fsdp.activations == alone.activations
    assert ddp.comm_bytes == pytest.approx(2 * 3 / 4 * alone.weights, rel=1e-6)  # ring all-reduce of fp32 grads
    assert alone.comm_bytes == 0 and ddp.global_tokens_per_step == 4 * alone.global_tokens_per_step


def test_expert_parallelism_splits_the_experts_and_is_checked():
    config = load_run_config("tiny-cpu", overrides=[*SMALL, *MOE])
    ddp, split = plan_layout(config, Layout(4, "ddp")), plan_layout(config, Layout(4, "ddp", 4))
    assert split.weights < ddp.weights and split.comm_bytes != ddp.comm_bytes
    with pytest.raises(DarkhorseError, match="must divide the world size 6"):
        plan_layout(config, Layout(6, "ddp", 4))
    with pytest.raises(DarkhorseError, match=r"must divide model.moe.n_routed_experts \(8\)"):
        plan_layout(config, Layout(3, "ddp", 3))
    with pytest.raises(DarkhorseError, match="needs an MoE model"):
        plan_layout(load_run_config("tiny-cpu", overrides=SMALL), Layout(2, "ddp", 2))
    assert parse_bytes("80GiB") == parse_bytes("80G") == 80 * GIB


def test_params_says_whether_the_500b_layout_fits(capsys):
    args = ["params", "--preset", "genesis-500b", "--world-size", "64", "--parallel", "fsdp", "--expert-parallel", "8"]
    assert main([*args, "--device-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "64 x fsdp, expert parallel 8" in out and "does NOT fit" in out
    assert main([*args[:4], "512", *args[5:], "--device-memory", "80GiB"]) == 0
    assert "fits 80.00 GiB per device?" in capsys.readouterr().out


@pytest.mark.slow
def test_docs_scale_md_is_what_the_planner_writes():
    written = (Path(__file__).resolve().parents[2] / "docs" / "scale.md").read_text()
    assert written == markdown(["genesis-30b", "genesis-500b"], 80 * GIB), (
        "regenerate: PYTHONPATH=src python -m darkhorse.train.plan > docs/scale.md"
    )


def test_train_refuses_a_run_that_cannot_fit_before_building_it(tmp_path, prepared_dir, monkeypatch):
    monkeypatch.setattr(trainer_module, "available_memory", lambda device: 1024)
    config = load_run_config("tiny-cpu", overrides=[*SMALL, "train.max_steps=1"])
    with pytest.raises(DarkhorseError, match=r"needs about .* GiB per device .* has 0.0 GiB free"):
        train(config, [(prepared_dir, 1.0)], tmp_path / "run", verbose=False)


def test_train_warns_when_the_measured_speed_means_days(tmp_path, prepared_dir, monkeypatch, capsys):
    monkeypatch.setattr(trainer_module, "SLOW_RUN_SECONDS", 0)
    config = load_run_config("tiny-cpu", overrides=[*SMALL, "train.max_steps=4"])
    train(config, [(prepared_dir, 1.0)], tmp_path / "run", live=False)
    assert "the remaining 1 steps take about" in capsys.readouterr().out
