"""`train.minutes` / `--minutes`: a wall-clock budget drives the lr decay and the stop, and resumes exactly.

A fake clock (a counter that moves 0.5 s per reading; the trainer reads it once per step) makes
the time a run spends, and so its schedule, repeatable."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest

from darkhorse import checkpoint as ckpt
from darkhorse.cli import main
from darkhorse.config import TrainConfig, load_run_config
from darkhorse.errors import ConfigError
from darkhorse.train.dashboard import plain_line
from darkhorse.train.run_dir import plan_run
from darkhorse.train.schedule import lr_multiplier
from darkhorse.train.trainer import Trainer

TICK = 0.5  # seconds per clock reading: 0.1 minutes = 12 steps
SMALL = [
    "model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4", "train.warmup_steps=2",
    "train.eval_steps=2", "train.log_interval=1", "train.eval_interval=0", "train.schedule=wsd",
    "train.lr=1e-3", "train.min_lr_ratio=0.1",
]  # fmt: skip


def budget_config(*overrides: str):
    return load_run_config("tiny-cpu", overrides=[*SMALL, "train.minutes=0.1", "train.max_steps=0", *overrides])


def fake_clock():
    return itertools.count(0.0, TICK).__next__


def run(config, data, run_dir, resume=None):
    plan = plan_run(config, data, run_dir, resume)
    return Trainer(plan, verbose=False, clock=fake_clock()).run()


def steps_logged(run_dir) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def test_time_schedule_follows_the_budget_spent_and_ends_at_the_floor():
    train = TrainConfig(schedule="wsd", minutes=1.0, max_steps=0, warmup_steps=2, wsd_decay_fraction=0.2)
    spent = [0.0]
    multiplier = lr_multiplier(train, lambda: spent[0])
    assert multiplier(0) == pytest.approx(0.5) and multiplier(1) == 1.0  # warmup stays in steps
    # after 10 steps in 40 s, step 10 ends at 44 s: 73% of the budget, still stable
    spent[0] = 40.0
    assert multiplier(10) == 1.0
    spent[0] = 48.0  # step 10 ends at 52.8 s: 88%, 40% into the decay
    assert 0.1 < multiplier(10) < 1.0
    spent[0] = 54.0  # step 9 ends at 60 s: the step that spends the budget runs at the floor
    assert multiplier(9) == pytest.approx(0.1)
    cosine = lr_multiplier(TrainConfig(schedule="cosine", minutes=1.0, max_steps=0, warmup_steps=0), lambda: 27.0)
    assert cosine(9) == pytest.approx(0.55)  # step 9 ends at 30 s, half the budget: halfway down the cosine
    with pytest.raises(ValueError, match="seconds spent"):
        lr_multiplier(train)


def test_a_budget_run_stops_when_the_time_is_spent_with_the_decay_at_its_end(tmp_path, prepared_dir):
    result = run(budget_config(), [(prepared_dir, 1.0)], tmp_path / "run")
    assert result.step == 12 and not result.interrupted and result.checkpoint.name == "final"
    records = steps_logged(tmp_path / "run")
    lrs = [records[step]["lr"] for step in range(1, 13)]
    assert lrs[0] == pytest.approx(5e-4) and set(lrs[1:9]) == {1e-3}  # warmup, then stable to 80%
    assert all(a > b for a, b in zip(lrs[8:], lrs[9:], strict=False))  # decays over the last 20% ...
    assert lrs[-1] == pytest.approx(1e-4)  # ... to the floor on the last step
    assert records[12]["spent_s"] == 6.0
    assert plain_line(records[12], 0, 0.0, budget_s=6.0).startswith("step 12 (6s of 6s) | loss")
    assert ckpt.load_trainer_state(result.checkpoint)["spent_seconds"] == 6.0


def test_a_step_floor_holds_the_schedule_to_the_steps_where_the_clock_runs_out_first():
    train = TrainConfig(schedule="wsd", minutes=1.0, max_steps=0, min_steps=20, warmup_steps=2, min_lr_ratio=0.1)
    spent = [100.0]  # the budget is spent already: the steps say how far along the run is
    multiplier = lr_multiplier(train, lambda: spent[0])
    assert multiplier(14) == 1.0  # step 14 ends 15/20 = 75% of the way: stable
    assert 0.1 < multiplier(17) < 1.0  # 90%: half way down the decay
    assert multiplier(19) == pytest.approx(0.1)  # the 20th step runs at the floor
    spent[0] = 20.0  # step 17 ends at 21.2 s of 60: time is less far along than the steps (18 of 20) and leads
    assert multiplier(17) == 1.0
    with pytest.raises(ConfigError, match="train.min_steps .* a floor under train.minutes"):
        load_run_config("tiny-cpu", overrides=["train.min_steps=20"])
    with pytest.raises(ConfigError, match="train.min_steps"):
        budget_config("train.min_steps=-1")


def test_a_budget_run_with_a_step_floor_goes_on_past_the_clock_and_resumes_exactly(tmp_path, prepared_dir):
    """The fake clock spends the budget in 12 steps; a floor of 20 holds the run on, the decay over its last
    20% of the steps; cut at 14 by max_steps (it caps the floor too) and resumed, the run is bit-identical."""
    whole = run(budget_config("train.min_steps=20"), [(prepared_dir, 1.0)], tmp_path / "whole")
    assert whole.step == 20 and whole.checkpoint.name == "final"
    records = steps_logged(tmp_path / "whole")
    lrs = [records[step]["lr"] for step in range(1, 21)]
    assert set(lrs[1:16]) == {1e-3} and all(a > b for a, b in zip(lrs[15:], lrs[16:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4) and records[20]["spent_s"] == 10.0
    line = plain_line(records[12], 0, 4.0, budget_s=6.0, min_steps=20)
    assert line.startswith("step 12 of at least 20 (6s of 6s) | loss") and line.endswith("ETA 4s")
    capped = run(budget_config("train.min_steps=20", "train.max_steps=14"), [(prepared_dir, 1.0)], tmp_path / "split")
    assert capped.step == 14
    resumed = run(budget_config("train.min_steps=20"), [], tmp_path / "split", resume=True)
    assert resumed.step == 20
    split = steps_logged(tmp_path / "split")
    assert [(r["loss"], r["lr"], r["spent_s"]) for r in records.values()] == [
        (r["loss"], r["lr"], r["spent_s"]) for r in split.values()
    ]


def test_the_dashboard_counts_down_the_steps_a_floor_still_asks_for():
    from darkhorse.train.dashboard import Dashboard

    dashboard = Dashboard(".", max_steps=0, start_step=0, budget_s=6.0, min_steps=20, train_tokens=1, verbose=False)
    assert dashboard.eta({"step": 12, "spent_s": 6.0}) == pytest.approx(4.0)  # 8 steps at 0.5 s
    assert dashboard.eta({"step": 4, "spent_s": 2.0}) == pytest.approx(8.0)  # the clock's 4 s, the steps' 8 s
    assert dashboard.eta({"step": 20, "spent_s": 10.0}) == 0.0


@pytest.mark.parametrize("warmup", [[], ["train.batch_warmup_steps=8", "train.seq_warmup_steps=8"]])
def test_a_budget_run_resumes_exactly_and_max_steps_still_caps(tmp_path, prepared_dir, warmup):
    """Also with the batch and the windows still growing (issue 17) where the run is cut."""
    whole = run(budget_config(*warmup), [(prepared_dir, 1.0)], tmp_path / "whole")
    capped = run(budget_config("train.max_steps=5", *warmup), [(prepared_dir, 1.0)], tmp_path / "split")
    assert capped.step == 5 and ckpt.load_trainer_state(capped.checkpoint)["spent_seconds"] == 2.5
    resumed = run(budget_config(*warmup), [], tmp_path / "split", resume=True)
    assert resumed.step == whole.step == 12
    a, b = steps_logged(tmp_path / "whole"), steps_logged(tmp_path / "split")
    assert list(b) == list(range(1, 13))
    assert [(r["loss"], r["lr"], r["spent_s"], r["tokens_seen"]) for r in a.values()] == [
        (r["loss"], r["lr"], r["spent_s"], r["tokens_seen"]) for r in b.values()
    ]  # bit-identical
    # batch 4 x 32 tokens; warm-up: rows 1, 1, 2, 2, 3, 3, 4, 4 and windows of 16, 16, 16, 16, 32 ... tokens
    assert b[12]["tokens_seen"] == (sum([16, 16, 32, 32, 96, 96, 128, 128]) + 4 * 128 if warmup else 12 * 128)
    weights = [(tmp_path / run_dir / "final" / "model.safetensors").read_bytes() for run_dir in ("whole", "split")]
    assert weights[0] == weights[1]


def test_bad_budgets_are_refused(tmp_path, prepared_dir, capsys):
    for value in ("-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="train.minutes"):
            budget_config(f"train.minutes={value}")
    with pytest.raises(ConfigError, match="train.max_steps must be > 0 without train.minutes"):
        load_run_config("tiny-cpu", overrides=["train.max_steps=0"])
    for value in ("0", "-2", "nan", "inf", "soon"):
        with pytest.raises(SystemExit) as refused:
            main(["train", "--preset", "tiny-cpu", "--data", str(prepared_dir), "--out", "x", "--minutes", value])
        assert refused.value.code == 2 and "argument --minutes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_train_minutes_on_the_real_clock_stops_on_time_with_the_lr_decayed(tmp_path, prepared_dir):
    out = tmp_path / "run"
    args = ["--preset", "tiny-cpu", "--data", str(prepared_dir), "--out", str(out), "--minutes", "0.02", "--quiet"]
    assert main(["train", *args, *SMALL, "train.warmup_steps=0"]) == 0
    records = steps_logged(out)
    last = records[max(records)]
    assert last["spent_s"] >= 1.2 and (out / "final" / "model.safetensors").is_file()
    assert last["lr"] < 0.5e-3  # the decay ran: wsd ends near min_lr_ratio x lr on the budget's last step


def test_minutes_flag_sets_the_budget_and_lifts_the_step_cap_unless_one_is_given():
    from darkhorse.commands.common import take_run_overrides

    def overrides(minutes, max_steps, *given):
        args = SimpleNamespace(resume=None, minutes=minutes, max_steps=max_steps, overrides=list(given))
        take_run_overrides(args)
        return load_run_config("tiny-cpu", overrides=args.overrides).train

    timed = overrides(2.5, None)
    assert (timed.minutes, timed.max_steps) == (2.5, 0)
    assert overrides(2.5, 300).max_steps == overrides(2.5, None, "train.max_steps=300").max_steps == 300
    assert overrides(None, None).minutes == 0


def test_demo_trains_on_the_clock_and_keeps_max_steps_exact(monkeypatch):
    from rich.console import Console

    from darkhorse.commands import demo

    monkeypatch.setattr(demo, "probe_step_seconds", lambda config, data, console: 0.1)
    prepared = SimpleNamespace(vocab_size=512, path=None)
    args = SimpleNamespace(
        quick=False, seed=0, preset="demo-cpu", overrides=[], minutes=0.5, max_steps=None, min_steps=0
    )
    timed = demo._build_config(args, prepared, Console(quiet=True)).train
    assert (timed.minutes, timed.max_steps, timed.min_steps, timed.warmup_steps, timed.eval_interval) == (
        0.5, 0, 0, 15, 75
    )  # fmt: skip
    args.min_steps = None  # the default floor: 30 s buy 300 steps here, so the demo expects its 1,500
    floored = demo._build_config(args, prepared, Console(quiet=True)).train
    assert (floored.min_steps, floored.warmup_steps, floored.source_steps) == (demo.MIN_STEPS, 75, 750)
    args.minutes = 5.0  # 3,000 steps in the budget: the floor is no limit
    assert demo._build_config(args, prepared, Console(quiet=True)).train.source_steps == 1500
    args.max_steps = 40
    stepped = demo._build_config(args, prepared, Console(quiet=True)).train
    assert (stepped.minutes, stepped.max_steps, stepped.min_steps) == (0, 40, 0)
