"""Training on several processes with torchrun and gloo on CPU: DDP and FSDP against one process,
sharded checkpoints resumed at other world sizes, ALF statistics across ranks, a rank that dies.

Every run reads the same tiny prepared corpus; a 2-rank run with train.batch_size=B reads the
windows a 1-process run with 2B does, so their losses agree up to float summation order (over 20
steps of AdamW they stay within 1e-4 relative; we measured ~1e-7).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from darkhorse.checkpoint import load_model
from darkhorse.config import load_run_config
from darkhorse.errors import DarkhorseError
from darkhorse.train.sharded import consolidate
from darkhorse.train.trainer import train

WORKER = Path(__file__).with_name("worker.py")
# AdamW: one optimizer keeps the DDP and FSDP runs comparable (Muon has tests of its own)
SMALL = [
    "model.n_layers=2", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
    "model.max_seq_len=64", "train.seq_len=32", "train.warmup_steps=2", "train.log_interval=1",
    "train.eval_interval=0", "train.schedule=constant", "train.optimizer=adamw",
]  # fmt: skip
MOE = [
    "model.ffn=moe", "model.moe.n_routed_experts=4", "model.moe.experts_per_token=2", "model.moe.first_k_dense=0",
    "model.moe.moe_intermediate_size=32", "model.moe.bias_update_rate=0.01",
]  # fmt: skip
RTOL = 1e-4


def torchrun(nproc: int, data: Path, run_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return run_ranks([*command, str(WORKER), str(data), str(run_dir), *args], timeout, run_dir)


def run_ranks(command: list[str], timeout: float, run_dir: Path | None = None) -> subprocess.CompletedProcess:
    """`command` (a torchrun launch) to its end; past `timeout` the test fails with what each rank was
    doing: the workers print their Python stacks on SIGUSR1 (worker.py, ep_worker.py), then all are killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    ) as launch:
        try:
            stdout, stderr = launch.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            ranks = _descendants(launch.pid)  # torchrun starts each rank in a session of its own
            for pid in ranks:
                os.kill(pid, signal.SIGUSR1)
            time.sleep(2)
            for pid in [launch.pid, *ranks]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stdout, stderr = launch.communicate()
            logs = sorted((run_dir / "logs").glob("*.log")) if run_dir else []
            tails = "".join(f"\n--- {log.name}:\n{log.read_text()[-1500:]}" for log in logs)
            pytest.fail(f"the ranks hung past {timeout:.0f} s:\n{stdout[-2000:]}\n{stderr[-6000:]}{tails}")
    return subprocess.CompletedProcess(command, launch.returncode, stdout, stderr)


def _descendants(root: int) -> list[int]:
    """The processes below `root` (its children, theirs, ...)."""
    parent_of = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (proc / "stat").read_text()
                parent_of[int(proc.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def one_process(data: Path, run_dir: Path, *overrides: str) -> dict[int, float]:
    config = load_run_config("tiny-cpu", overrides=[*SMALL, *overrides])
    train(config, [(data, 1.0)], run_dir, verbose=False)
    return losses(run_dir)


def assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert list(got) == list(want)
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=RTOL), f"step {step}"


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_and_share_one_alf_bias(tmp_path, prepared_dir, parallel):
    """20 steps of an MoE model on 2 ranks (accumulating 2 micro-batches) against 1 process with the same
    global batch: same losses; every rank holds the same ALF bias, the one the 1-process run reaches
    (expert loads are summed over the ranks before each bias step; DDP does not broadcast buffers)."""
    steps = ["train.max_steps=20", "train.save_interval=0", "train.grad_accum=2", *MOE]
    want = one_process(prepared_dir, tmp_path / "one", *steps, "train.batch_size=4")
    done = torchrun(
        2, prepared_dir, tmp_path / "two", *SMALL, *steps, "train.batch_size=2", f"train.parallel={parallel}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close(losses(tmp_path / "two"), want)
    logs = sorted(p.name for p in (tmp_path / "two" / "logs").iterdir())
    assert logs == ["rank-0.log", "rank-1.log"]
    assert "step 20/20" in (tmp_path / "two" / "logs" / "rank-1.log").read_text()

    rank0, rank1 = (torch.load(tmp_path / "two" / f"bias-rank{r}.pt") for r in (0, 1))
    single, _, _ = load_model(tmp_path / "one" / "final")
    assert rank0.keys() == rank1.keys() and rank0
    for name, bias in rank0.items():
        assert torch.equal(bias, rank1[name]), name
        assert bias.abs().sum() > 0 and torch.allclose(bias, single.get_buffer(name)), name


SHARDED = [*SMALL, "train.parallel=fsdp", "train.batch_size=3", "train.save_interval=3"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, module_prepared_dir):
    """A 2-rank FSDP run stopped at step 3 (sharded checkpoints), and the 1-process run it continues."""
    root, data = tmp_path_factory.mktemp("sharded"), module_prepared_dir
    want = one_process(data, root / "one", "train.batch_size=6", "train.max_steps=5")
    done = torchrun(2, data, root / "run", *SHARDED, "train.max_steps=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "run" / "step-000003" / "shards" / ".metadata").is_file()
    return data, root, want


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 3])  # 6 rows per step: 6 on one rank, 2 on each of three
def test_sharded_checkpoint_resumes_at_another_world_size(tmp_path, sharded_run, nproc):
    data, root, want = sharded_run
    shutil.copytree(root / "run", tmp_path / "run")
    resumed = torchrun(nproc, data, tmp_path / "run", *SHARDED, "train.max_steps=5", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(losses(tmp_path / "run"), want)
    if nproc == 3:  # the sharded final checkpoint becomes today's single file, with the 1-process weights
        with pytest.raises(DarkhorseError, match="darkhorse consolidate"):
            load_model(tmp_path / "run" / "final")
        model, _, meta = load_model(consolidate(tmp_path / "run" / "final", tmp_path / "consolidated"))
        reference, _, _ = load_model(root / "one" / "final")
        assert meta["step"] == 5
        for name, tensor in reference.state_dict().items():
            assert torch.allclose(model.state_dict()[name], tensor, atol=1e-5), name


@pytest.mark.slow
def test_fsdp_trains_with_muon_as_one_process_does_and_resumes(tmp_path, prepared_dir):
    """Muon under FSDP: expert stacks orthogonalised where their shards lie (whole experts), matrices
    gathered whole; the losses of one process, across a sharded save and resume."""
    settings = [*SMALL, *MOE, "train.optimizer=muon", "train.save_interval=3"]
    want = one_process(prepared_dir, tmp_path / "one", *settings, "train.batch_size=4", "train.max_steps=5")
    for steps in (["train.max_steps=3"], ["train.max_steps=5", "--resume"]):
        done = torchrun(
            2, prepared_dir, tmp_path / "two", *settings, "train.batch_size=2", "train.parallel=fsdp", *steps
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "two" / "step-000003" / "shards").is_dir()
    assert_close(losses(tmp_path / "two"), want)


@pytest.mark.slow
def test_a_dying_rank_makes_the_others_exit_with_a_clear_error(tmp_path, prepared_dir):
    """Rank 1 exits hard at step 3 of 50; rank 0 must stop with one line, not hang (the subprocess timeout
    would fail the test: train.dist_timeout bounds any wait at 20 s)."""
    done = torchrun(
        2, prepared_dir, tmp_path / "run", *SMALL, "train.max_steps=50", "train.save_interval=0",
        "train.batch_size=2", "train.parallel=ddp", "train.dist_timeout=20", "--die-at", "3", timeout=240,
    )  # fmt: skip
    assert done.returncode != 0
    assert "darkhorse: error: rank 0: lost the other ranks" in done.stderr


@pytest.mark.slow
def test_a_rank_failing_with_a_collective_in_flight_ends_the_run_at_once(tmp_path, prepared_dir):
    """Its exception, not a hang until train.dist_timeout: a normal exit would wait on the collective."""
    done = torchrun(
        2, prepared_dir, tmp_path / "run", *SMALL, *MOE, "train.max_steps=5", "train.batch_size=2",
        "train.parallel=ddp", "train.expert_parallel=2", "train.dist_timeout=600", "--fail-in-flight", "2",
        timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "darkhorse: error: rank 1: injected failure with a collective in flight" in done.stderr


def test_parallel_training_without_torchrun_is_refused(tmp_path, prepared_dir):
    config = load_run_config("tiny-cpu", overrides=[*SMALL, "train.parallel=fsdp", "train.max_steps=1"])
    with pytest.raises(DarkhorseError, match="train.parallel=fsdp runs under torchrun"):
        train(config, [(prepared_dir, 1.0)], tmp_path / "run", verbose=False)


@pytest.mark.slow
def test_resuming_with_a_missing_shard_names_it_once(tmp_path, sharded_run):
    """Also when rank 0 meets the refusal last: rank 1 leaving first had torchrun stop rank 0 unsaid."""
    data, root, _ = sharded_run
    shutil.copytree(root / "run", tmp_path / "run")
    for checkpoint in ("step-000003", "final"):
        (tmp_path / "run" / checkpoint / "shards" / "__1_0.distcp").unlink()
    done = torchrun(2, data, tmp_path / "run", *SHARDED, "train.max_steps=5", "--resume", "--late-rank-0", "2")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("darkhorse: error:")]
    assert len(errors) == 1, done.stderr[-3000:]  # rank 0 says it; rank 1 exits quietly
    assert "missing 1 of its 2 shard files: __1_0.distcp" in errors[0]


def test_a_world_size_that_does_not_divide_the_global_batch_is_refused():
    from darkhorse.errors import DarkhorseError
    from darkhorse.train.distributed import per_rank_batch

    assert per_rank_batch(3, saved_world=2, world=3) == 2
    with pytest.raises(DarkhorseError, match="4 ranks cannot split that evenly"):
        per_rank_batch(3, saved_world=2, world=4)


@pytest.mark.slow
def test_train_nproc_starts_torchrun(tmp_path, prepared_dir):
    """Also a time budget over ranks: they average their clocks, so all stop after the same step."""
    overrides = [*SMALL, "train.save_interval=0", "train.batch_size=2"]
    command = [sys.executable, "-m", "darkhorse", "train", "--nproc", "2", "--preset", "tiny-cpu", "--minutes", "0.02"]
    done = run_ranks([*command, "--data", str(prepared_dir), "--out", str(tmp_path / "run"), *overrides], 300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 ranks, train.parallel=ddp: global batch 2 x 1 x 2 = 4 windows" in done.stdout
    assert done.stdout.count("training tiny-cpu") == 1  # only rank 0 prints
    steps = sorted(losses(tmp_path / "run"))
    assert steps == list(range(1, len(steps) + 1)) and (tmp_path / "run" / "final" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if "loss" in r][-1]["spent_s"] >= 1.2
    assert (tmp_path / "run" / "logs" / "rank-1.log").is_file()


@pytest.mark.slow
def test_expert_parallel_layer_equals_the_whole_layer(tmp_path):
    """Two ranks, four experts each, half the batch each: outputs and gradients equal the whole layer's."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = run_ranks([*command, str(WORKER.with_name("ep_worker.py"))], timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "rank 0: equal" in done.stdout and "rank 1: equal" in done.stdout


@pytest.mark.slow
def test_expert_parallel_training_matches_one_process_and_resumes(tmp_path, prepared_dir):
    settings = [*SMALL, *MOE, "train.save_interval=3"]
    want = one_process(prepared_dir, tmp_path / "one", *settings, "train.batch_size=4", "train.max_steps=5")
    ep = [*settings, "train.batch_size=2", "train.parallel=ddp", "train.expert_parallel=2"]
    first = torchrun(2, prepared_dir, tmp_path / "ep", *ep, "train.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(2, prepared_dir, tmp_path / "ep", *ep, "train.max_steps=5", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(losses(tmp_path / "ep"), want)
    model, _, _ = load_model(tmp_path / "ep" / "final")  # the checkpoint holds every expert, as one process saves
    reference, _, _ = load_model(tmp_path / "one" / "final")
    for name, tensor in reference.state_dict().items():
        assert torch.allclose(model.state_dict()[name], tensor, atol=1e-5), name


@pytest.mark.slow
def test_expert_parallel_muon_saves_the_one_process_layout_and_resumes_exactly(tmp_path, prepared_dir):
    """An expert stack's Muon momentum has the stack's shape: the checkpoint holds all E rows, as one
    process would, and on resume each rank takes its own rows back (when Muon kept one entry per expert,
    the checkpoint held rank 0's and every rank resumed with them)."""
    from darkhorse.checkpoint import load_trainer_state

    settings = [*SMALL, *MOE, "train.save_interval=3", "train.optimizer=muon"]
    one_process(prepared_dir, tmp_path / "one", *settings, "train.batch_size=4", "train.max_steps=3")
    ep = [*settings, "train.batch_size=2", "train.parallel=ddp", "train.expert_parallel=2"]
    for run, steps in [("ep", ["train.max_steps=3"]), ("ep", ["train.max_steps=5", "--resume"]), ("whole", [])]:
        done = torchrun(2, prepared_dir, tmp_path / run, *ep, *(steps or ["train.max_steps=5"]))
        assert done.returncode == 0, done.stderr[-3000:]
    saved, single = (load_trainer_state(tmp_path / r / "step-000003")["optimizers"][0] for r in ("ep", "one"))
    assert saved["param_groups"][0]["params"] == single["param_groups"][0]["params"]
    assert saved["state"].keys() == single["state"].keys()
    assert losses(tmp_path / "ep") == losses(tmp_path / "whole")
    resumed, whole = (load_model(tmp_path / r / "final")[0].state_dict() for r in ("ep", "whole"))
    for name, tensor in whole.items():
        assert torch.equal(resumed[name], tensor), name


def test_expert_parallel_layouts_that_cannot_work_are_refused(tmp_path, prepared_dir):
    from darkhorse.train.distributed import World
    from darkhorse.train.parallel import check_parallel_config

    def check(*overrides: str, world: int = 2) -> None:
        check_parallel_config(load_run_config("tiny-cpu", overrides=[*SMALL, *overrides]), World(size=world))

    with pytest.raises(DarkhorseError, match="runs with train.parallel=ddp"):
        check(*MOE, "train.expert_parallel=2", "train.parallel=fsdp")
    with pytest.raises(DarkhorseError, match="start 2 ranks, not 4"):
        check(*MOE, "train.expert_parallel=2", "train.parallel=ddp", world=4)
    with pytest.raises(DarkhorseError, match=r"must divide model.moe.n_routed_experts \(4\)"):
        check(*MOE, "train.expert_parallel=3", "train.parallel=ddp", world=3)
    with pytest.raises(DarkhorseError, match="needs an MoE model"):
        check("train.expert_parallel=2", "train.parallel=ddp")


def test_fsdp_refuses_hooks_that_save_their_own_format(tmp_path, prepared_dir, monkeypatch):
    """LoRA fine-tuning writes adapters, which sharded training cannot yet: one line, under torchrun too."""
    import torch.distributed as dist

    from darkhorse.train.run_dir import plan_run
    from darkhorse.train.trainer import Trainer, TrainingHooks

    class OwnFormat(TrainingHooks):
        def save(self, trainer, folder, meta, state):
            raise AssertionError("never reached")

    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    config = load_run_config("tiny-cpu", overrides=[*SMALL, "train.parallel=fsdp", "train.max_steps=1"])
    try:
        with pytest.raises(DarkhorseError, match="saves its own checkpoint format"):
            Trainer(plan_run(config, [(prepared_dir, 1.0)], tmp_path / "run"), hooks=OwnFormat(), verbose=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_finished_run_drops_its_ddp_wrapper_before_the_process_group(tmp_path, prepared_dir, monkeypatch):
    """DDP's reducer holds the process group; were it the last holder, its destructor would join gloo's
    threads with the GIL held while one of them waits for the GIL (a hang at exit, ~1 in 40 runs)."""
    import gc
    import weakref

    import torch.distributed as dist

    from darkhorse.train.run_dir import plan_run
    from darkhorse.train.trainer import Trainer

    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    config = load_run_config("tiny-cpu", overrides=[*SMALL, "train.parallel=ddp", "train.max_steps=2"])
    try:
        trainer = Trainer(plan_run(config, [(prepared_dir, 1.0)], tmp_path / "run"), verbose=False)
        wrapper = weakref.ref(trainer.wrapped)
        assert wrapper() is not trainer.model  # DDP
        trainer.run()
        gc.collect()
        assert wrapper() is None and trainer.wrapped is trainer.model and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_lora_finetune_under_fsdp_matches_one_process(tmp_path, tiny_dense_checkpoint):
    """The frozen base is sharded, the adapters stay whole on every rank; same losses and adapter as one process."""
    from safetensors.torch import load_file

    from darkhorse.data.chat_format import render_conversation  # noqa: F401  (the format the records use)
    from darkhorse.finetune.run import finetune

    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    chats = tmp_path / "chats.jsonl"
    records = [
        {"messages": [{"role": "user", "content": f"after {a}?"}, {"role": "assistant", "content": f"{b} {a} {b}"}]}
        for a, b in zip(words * 3, words[1:] * 3, strict=False)
    ]
    chats.write_text("".join(json.dumps(record) + "\n" for record in records))
    settings = ["train.seq_len=32", "train.log_interval=1", "train.eval_interval=0", "train.lr=1e-2",
                "train.max_steps=4", "train.save_interval=0"]  # fmt: skip
    finetune(
        tiny_dense_checkpoint,
        [str(chats)],
        tmp_path / "one",
        overrides=[*settings, "train.batch_size=4"],
        verbose=False,
    )  # fmt: skip  (also prepares the chats into the cache the ranks then read)
    fsdp = [*settings, "train.batch_size=2", "train.parallel=fsdp"]
    done = torchrun(2, chats, tmp_path / "two", "--finetune", str(tiny_dense_checkpoint), *fsdp)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"))
    one, two = (load_file(tmp_path / run / "final" / "adapter_model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys() and one
    for name, tensor in one.items():
        assert torch.allclose(two[name], tensor, atol=1e-5), name
