"""Fault injection (issue 15): runs killed with SIGKILL at seeded points during training, saves and
prunes, a disk that fills up, damaged checkpoints of each kind and two runs into one dir.

After every fault the run dir may hold only intact checkpoints under valid names, and running the
same command again (a fresh start when nothing was saved yet, else --resume) must end with final
weights byte-identical to an uninterrupted run and each step once in metrics.jsonl. A kill is a real
SIGKILL: the run trains in a forked child that sends it to itself at the chosen point (the point is
reached by patching that child only), so nothing of the run's own cleanup gets to run.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from darkhorse import checkpoint as ckpt
from darkhorse import files
from darkhorse.config import load_run_config
from darkhorse.errors import DarkhorseError
from darkhorse.train.trainer import Trainer, train
from tests.conftest import write_prepared_dir

# the forked children train in one thread and touch nothing the parent's other threads hold (macOS's
# runtime may abort a child forked from a process that loaded torch: the module runs on Linux)
pytestmark = [
    pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning"),
    pytest.mark.skipif(sys.platform != "linux", reason="forks a process that has torch loaded (Linux only)"),
]

SETTINGS = [
    "model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4", "train.warmup_steps=2",
    "train.eval_interval=0", "train.log_interval=1", "train.save_interval=2", "train.keep_last=2",
]  # fmt: skip
MAX_STEPS = 8
SAVES = MAX_STEPS // 2  # step-2, -4, -6, -8; then final/
SAVE_STAGES = ("weights written", "state half-written", "before rename", "after rename")
PRUNE_STAGES = ("renamed", "half deleted")


def config(max_steps: int = MAX_STEPS):
    return load_run_config("tiny-cpu", overrides=[*SETTINGS, f"train.max_steps={max_steps}"])


def _faults(seed: int = 15) -> list[tuple[str, int, str]]:
    """12 seeded (where, which occurrence, stage) faults: 4 during steps, 5 in saves, 3 in prunes."""
    rng = random.Random(seed)
    faults = [("step", step, "") for step in rng.sample(range(1, MAX_STEPS + 1), 4)]
    saves = [(count, stage) for count in range(1, SAVES + 2) for stage in SAVE_STAGES]
    faults += [("save", count, stage) for count, stage in rng.sample(saves, 5)]
    prunes = [(count, stage) for count in range(1, SAVES - 1) for stage in PRUNE_STAGES]
    faults += [("prune", count, stage) for count, stage in rng.sample(prunes, 3)]
    return faults


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_prepared_dir(tmp_path_factory.mktemp("fault-data") / "prepared")


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory) -> tuple[bytes, list[int]]:
    """Final weights and metrics steps of the uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("fault-baseline") / "run"
    train(config(), [(data, 1.0)], run_dir, verbose=False)
    return (run_dir / ckpt.FINAL_NAME / ckpt.MODEL_FILE).read_bytes(), _steps(run_dir)


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _on_call(count: int, before=None, after=None):
    """A wrapper factory: the `count`-th call of the wrapped function runs `before` / `after` around it."""

    def wrap(function):
        calls = {"n": 0}

        def wrapped(*args, **kwargs):
            calls["n"] += 1
            hit = calls["n"] == count
            if hit and before:
                before(*args)
            result = function(*args, **kwargs)
            if hit and after:
                after(*args)
            return result

        return wrapped

    return wrap


def _install(fault: tuple[str, int, str]) -> None:
    """Patch this (child) process so it SIGKILLs itself at `fault`."""
    where, count, stage = fault
    if where == "step":
        Trainer.train_step = _on_call(count, before=lambda *_: _die())(Trainer.train_step)
    elif where == "save":
        if stage == "weights written":
            ckpt.write_safetensors = _on_call(count, after=lambda *_: _die())(ckpt.write_safetensors)
        elif stage == "state half-written":

            def truncate_and_die(state, file):  # checkpoint.save_trainer_state saves into a file it opened
                file.flush()
                os.truncate(file.name, os.path.getsize(file.name) // 2)
                _die()

            torch.save = _on_call(count, after=truncate_and_die)(torch.save)
        else:  # the rename that publishes the checkpoint (prunes rename with Path.rename, not os.replace)
            hook = {"before": lambda *_: _die()} if stage == "before rename" else {"after": lambda *_: _die()}
            files.os.replace = _on_call(count, **hook)(os.replace)
    else:  # prune: the count-th checkpoint removed, once renamed aside (files.remove_dir's rmtree)
        rmtree, removed = shutil.rmtree, {"n": 0}

        def prune_then_die(path, *args, **kwargs):
            if kwargs.get("ignore_errors"):  # a save's own temp dir, not a removal
                return rmtree(path, *args, **kwargs)
            removed["n"] += 1
            if removed["n"] == count:
                if stage == "half deleted":
                    victims = sorted(p for p in Path(path).rglob("*") if p.is_file())
                    for victim in victims[: len(victims) // 2 + 1]:
                        victim.unlink()
                _die()
            return rmtree(path, *args, **kwargs)

        files.shutil.rmtree = prune_then_die


def _run_killed(run_dir: Path, data: Path, fault: tuple[str, int, str]) -> None:
    """Train in a forked child until `fault` kills it with SIGKILL."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            _install(fault)
            train(config(), [(data, 1.0)], run_dir, verbose=False)
        except BaseException:
            status = 3
        os._exit(status)
    deadline = time.monotonic() + 120
    while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the run with fault {fault} hung")
        time.sleep(0.01)
    status = waited[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (fault, status)


def _assert_only_intact_checkpoints(run_dir: Path) -> None:
    """No half-written or half-deleted directory under a valid checkpoint name."""
    for folder in run_dir.iterdir():
        if folder.name.startswith(ckpt.STEP_PREFIX) or folder.name == ckpt.FINAL_NAME:
            assert ckpt.damage(folder) is None, folder
            names = {p.name for p in folder.iterdir()}
            assert {ckpt.META_FILE, ckpt.MODEL_FILE, ckpt.STATE_FILE} <= names, (folder, names)


def _run_again(run_dir: Path, data: Path) -> None:
    """What the user does next: --resume, or start again when the killed run saved nothing."""
    if ckpt.latest_checkpoint(run_dir) is None:
        train(config(), [(data, 1.0)], run_dir, verbose=False)
    else:
        train(config(), [], run_dir, resume=True, verbose=False)


@pytest.mark.slow  # 12 killed runs and their resumes (~1 s each)
@pytest.mark.parametrize("fault", _faults(), ids=lambda f: "-".join(map(str, f)).replace(" ", "_").strip("-"))
def test_a_run_killed_anywhere_resumes_exactly(tmp_path, data, baseline, fault):
    run_dir = tmp_path / "run"
    _run_killed(run_dir, data, fault)
    _assert_only_intact_checkpoints(run_dir)
    _run_again(run_dir, data)
    weights, steps = baseline
    assert (run_dir / ckpt.FINAL_NAME / ckpt.MODEL_FILE).read_bytes() == weights
    assert _steps(run_dir) == steps  # each step once: no records of the killed run's lost steps
    assert not [p for p in run_dir.iterdir() if files.PARTIAL_MARK in p.name]  # leftovers cleared


def _damage_weights(folder: Path) -> None:
    os.truncate(folder / ckpt.MODEL_FILE, 2000)


def _damage_meta(folder: Path) -> None:
    (folder / ckpt.META_FILE).write_text('{"config": {"model": ')


def _damage_state(folder: Path) -> None:
    path = folder / ckpt.STATE_FILE
    os.truncate(path, path.stat().st_size - 100)


@pytest.mark.parametrize("damage", [_damage_weights, _damage_meta, _damage_state], ids=lambda f: f.__name__[8:])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, data, baseline, damage, capsys):
    run_dir = tmp_path / "run"
    _run_killed(run_dir, data, ("step", 7, ""))  # leaves step-4 and step-6
    damage(run_dir / ckpt.step_name(6))
    assert ckpt.damage(run_dir / ckpt.step_name(6)) is not None
    with pytest.raises(DarkhorseError, match="damaged"):  # named explicitly, it is refused
        train(config(), [], run_dir, resume=run_dir / ckpt.step_name(6), verbose=False)
    train(config(), [], run_dir, resume=True, verbose=False)
    assert f"{ckpt.step_name(6)} is damaged" in capsys.readouterr().err
    assert (run_dir / ckpt.FINAL_NAME / ckpt.MODEL_FILE).read_bytes() == baseline[0]
    assert _steps(run_dir) == baseline[1]


def test_two_runs_into_one_dir_and_a_killed_holder(tmp_path, data):
    from darkhorse.train.run_dir import claimed_run_dir

    run_dir = tmp_path / "run"
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a run that holds the dir
        with claimed_run_dir(run_dir):
            os.write(ready_write, b"x")
            time.sleep(120)
        os._exit(0)
    try:
        os.read(ready_read, 1)
        with pytest.raises(DarkhorseError, match=rf"in use by another run \(pid {pid}\)"):
            train(config(2), [(data, 1.0)], run_dir, verbose=False)
        assert not list(run_dir.glob(f"{ckpt.STEP_PREFIX}*")) and not (run_dir / "metrics.jsonl").exists()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert train(config(2), [(data, 1.0)], run_dir, verbose=False).step == 2  # its stale lock is taken over


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (one checkpoint of the run fits, two do not); skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, text=True
        )
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def _open_files_under(folder: Path) -> list[str]:
    """Paths under `folder` that this process holds open (deleted files included)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the fd listdir itself used, gone by now
            continue
        if target.startswith(str(folder)):
            held.append(target)
    return held


def test_a_full_disk_loses_nothing(tmp_path, data, baseline, tiny_disk):
    run_dir = tiny_disk / "run"
    with pytest.raises(OSError) as caught:  # the CLI's error boundary turns it into one line
        train(config(), [(data, 1.0)], run_dir, verbose=False)
    assert caught.value.errno == errno.ENOSPC
    assert not _open_files_under(tiny_disk)  # the failed write closed its file: the disk is not held busy
    assert ckpt.training_checkpoints(run_dir)  # what fitted is kept...
    _assert_only_intact_checkpoints(run_dir)  # ...and nothing half-written looks valid
    assert not [p for p in run_dir.iterdir() if files.PARTIAL_MARK in p.name]
    moved = shutil.copytree(run_dir, tmp_path / "roomy")  # given space, the run goes on exactly
    train(config(), [], moved, resume=True, verbose=False)
    assert (moved / ckpt.FINAL_NAME / ckpt.MODEL_FILE).read_bytes() == baseline[0]
