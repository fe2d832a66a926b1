"""Runs, checkpoints and signals (issue 15): the run-dir lock, leftovers of failed runs, metrics on
resume, diverged models, running out of memory, signal exit codes and long documents in `prepare`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from darkhorse import checkpoint as ckpt
from darkhorse.config import load_run_config
from darkhorse.errors import DarkhorseError
from darkhorse.train.device import out_of_memory_as_advice
from darkhorse.train.run_dir import LOCK_FILE, claimed_run_dir
from darkhorse.train.trainer import train
from tests.conftest import write_prepared_dir

SMALL = [
    "model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4", "train.warmup_steps=0",
    "train.schedule=constant", "train.eval_interval=0", "train.log_interval=1",
]  # fmt: skip
CPU_OOM = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate 8"


def config(*overrides: str):
    return load_run_config("tiny-cpu", overrides=[*SMALL, *overrides])


def steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_a_second_run_into_a_locked_dir_is_refused_naming_the_holder(tmp_path, prepared_dir):
    run_dir = tmp_path / "run"
    holder = rf"in use by another run \(pid {os.getpid()}\)"  # flock is per open file: one process will do
    with claimed_run_dir(run_dir), pytest.raises(DarkhorseError, match=holder):
        train(config("train.max_steps=1"), [(prepared_dir, 1.0)], run_dir, verbose=False)
    (run_dir / LOCK_FILE).write_text("999999999\n")  # a killed run's lock file: the kernel dropped its lock
    assert train(config("train.max_steps=1"), [(prepared_dir, 1.0)], run_dir, verbose=False).step == 1


def test_other_ranks_of_a_distributed_run_share_rank_0s_lock(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with claimed_run_dir(run_dir):  # rank 0
        monkeypatch.setenv("RANK", "1")
        with claimed_run_dir(run_dir):
            pass


def test_a_failed_run_removes_the_run_dir_it_created_and_nothing_else(tmp_path, prepared_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the logger package is missing
    for kind in ("data", "logger"):
        run_dir = tmp_path / kind / "run"
        data = tmp_path / "missing" if kind == "data" else prepared_dir
        logger = "tensorboard" if kind == "logger" else None
        with pytest.raises(DarkhorseError):
            train(config("train.max_steps=1"), [(data, 1.0)], run_dir, logger=logger, verbose=False)
        assert not run_dir.exists(), kind
    kept = tmp_path / "kept"
    (kept / "notes.txt").parent.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(DarkhorseError):
        train(config("train.max_steps=1"), [(tmp_path / "missing", 1.0)], kept, verbose=False)
    assert (kept / "notes.txt").read_text() == "mine"


def test_metrics_on_resume_and_restart_hold_each_step_once(tmp_path, prepared_dir):
    run_dir = tmp_path / "run"
    train(config("train.max_steps=4", "train.save_interval=2"), [(prepared_dir, 1.0)], run_dir, verbose=False)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lr"')  # torn by a kill mid-write
    train(config("train.max_steps=6", "train.save_interval=2"), [], run_dir, resume=True, verbose=False)
    assert steps(run_dir) == [1, 2, 3, 4, 5, 6]

    # a run killed before its first checkpoint left records; starting again drops them
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    train(config("train.max_steps=3", "train.save_interval=0"), [(prepared_dir, 1.0)], fresh, verbose=False)
    assert steps(fresh) == [1, 2, 3]


def _prepared_with_tokenizer(path: Path) -> Path:
    from darkhorse.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.train([f"word{i} and word{i + 1} then more" for i in range(200)], vocab_size=300)
    write_prepared_dir(path, vocab_size=tokenizer.vocab_size, tokenizer_sha256=tokenizer.sha256)
    tokenizer.save(path / "tokenizer.json")
    return path


def test_a_diverged_model_is_never_saved_and_its_eval_does_not_crash(tmp_path, monkeypatch):
    from darkhorse.model import Transformer

    original = Transformer.after_optimizer_step

    def blow_up(self, step):  # what lr=1e9 does: the weights turn NaN after step 3
        original(self, step)
        if step == 3:
            with torch.no_grad():
                self.embed.weight.fill_(float("nan"))

    monkeypatch.setattr(Transformer, "after_optimizer_step", blow_up)
    data = _prepared_with_tokenizer(tmp_path / "data")
    run_dir = tmp_path / "run"
    settings = ["train.max_steps=20", "train.save_interval=1", "train.keep_last=20", "train.eval_interval=1",
                "train.eval_steps=1", "train.max_bad_steps=3"]  # fmt: skip
    with pytest.raises(DarkhorseError, match="3 non-finite losses in a row"):  # not a crash in sample()
        train(config(*settings), [(data, 1.0)], run_dir, verbose=False)
    assert [p.name for p in ckpt.training_checkpoints(run_dir)] == [ckpt.step_name(1), ckpt.step_name(2)]
    for folder in ckpt.training_checkpoints(run_dir):
        ckpt.load_model(folder)  # finite

    # a checkpoint saved with NaN weights (by an older darkhorse) is refused by every reader, with its step
    model, run_config, _ = ckpt.load_model(run_dir / ckpt.step_name(2))
    with torch.no_grad():
        model.embed.weight[0, 0] = float("inf")
    bad = ckpt.save_model_checkpoint(tmp_path / "bad", model, run_config, data / "tokenizer.json", {"step": 7})
    with pytest.raises(DarkhorseError, match=r"\(step 7\) is from a diverged run \(embed.weight holds NaN or inf"):
        ckpt.load_for_inference(bad)
    with pytest.raises(DarkhorseError, match=r"\(step 7\)"):
        ckpt.CheckpointTensors(bad).get("embed.weight")
    meta = json.loads((bad / ckpt.META_FILE).read_text())
    (bad / ckpt.META_FILE).write_text(json.dumps({**meta, "loss": float("nan")}))
    with pytest.raises(DarkhorseError, match="its loss is nan"):
        ckpt.CheckpointTensors(bad)


def test_running_out_of_cpu_memory_gives_the_advice_and_the_fit_warning_comes_first(
    tmp_path, prepared_dir, monkeypatch, capsys
):
    from darkhorse.model import Transformer

    advice = out_of_memory_as_advice(config(), torch.device("cpu"))
    with pytest.raises(DarkhorseError, match="out of memory on cpu; turn these knobs"), advice:
        raise RuntimeError(CPU_OOM)
    advice = out_of_memory_as_advice(config(), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="shape mismatch"), advice:  # any other RuntimeError passes through
        raise RuntimeError("shape mismatch")

    from darkhorse.train import plan

    planned = []
    monkeypatch.setattr(
        "darkhorse.train.trainer.plan_layout", lambda *args: planned.append(plan.plan_layout(*args)) or planned[-1]
    )
    # free memory that warns (the run needs > 1.2x it) but does not refuse (2x)
    monkeypatch.setattr("darkhorse.train.trainer.available_memory", lambda device: int(planned[-1].total / 1.5))
    run_config = config("train.max_steps=1")
    original = Transformer.__init__

    def build(self, model_config):
        if not str(torch.empty(0).device).startswith("meta"):
            raise RuntimeError(CPU_OOM)  # building the real model runs out
        original(self, model_config)

    monkeypatch.setattr(Transformer, "__init__", build)
    with pytest.raises(DarkhorseError, match="out of memory on cpu"):
        train(run_config, [(prepared_dir, 1.0)], tmp_path / "run")
    assert "it will likely run out of memory" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a console-script process (torch import) training until the signal
def test_ctrl_c_saves_then_exits_130(tmp_path, prepared_dir):
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "tiny-cpu", *SMALL, "--data", str(prepared_dir), "--out", str(run_dir)]
    process = subprocess.Popen(
        [sys.executable, "-m", "darkhorse", *args, "--max-steps", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    for line in process.stdout:
        if line.startswith("step 2/"):
            os.kill(process.pid, signal.SIGINT)
            break
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "stopped by SIGINT" in stdout and "Traceback" not in stderr
    assert ckpt.latest_checkpoint(run_dir) is not None


def test_long_documents_are_encoded_in_pieces_with_the_ids_of_the_whole():
    from darkhorse.data.prepare import encode_in_pieces, pieces
    from darkhorse.data.tokenizer import Tokenizer

    words = [f"w{i % 97}x{i % 13}" for i in range(3000)]
    text = " ".join(words).replace("w1x", "w1x,  ").replace("x7", "x7\n  ") + " tail"
    tokenizer = Tokenizer.train([text], vocab_size=300)
    ranges = pieces(text, 1000)
    assert len(ranges) > 10 and all(end - start <= 1000 for start, end in ranges)
    assert "".join(text[start:end] for start, end in ranges) == text
    whole = tokenizer.encode(text)
    ids, short = encode_in_pieces(tokenizer.encode_batch, [text, "short text"], chunk_chars=1000)
    assert ids.tolist() == whole and short == tokenizer.encode("short text")
    (offsets,) = encode_in_pieces(tokenizer.encode_offsets, [text], chunk_chars=1000, offsets=True)
    assert offsets == tokenizer.encode_offsets([text])[0]
    assert pieces("x" * 2500, 1000) == [(0, 1000), (1000, 2000), (2000, 2500)]  # no space: cut at the limit


MEMORY_PROBE = """
import resource, sys
from darkhorse.data.prepare import prepare
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare([sys.argv[1]], sys.argv[2], vocab_size=300, progress=False, txt_split="file", chunk_bytes=1 << 17)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow  # prepares 4 MiB in a child process
def test_prepare_of_one_long_line_stays_within_bounded_memory(tmp_path):
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    line = " ".join(rng.choice(words) for _ in range(20000))
    document = tmp_path / "one-line.txt"
    document.write_text(" ".join([line] * (4 * 2**20 // len(line) + 1)) + "\n")
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(document), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    growth_mib = int(probe.stdout.split()[-1])
    # ~210 MiB measured; tokenized whole, the line took 870 MiB here (6.7 GB for a 50 MB one)
    assert growth_mib < 400, growth_mib
    assert (tmp_path / "out" / "train.bin").stat().st_size > 2**20  # all of it was tokenized
