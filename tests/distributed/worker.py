"""One rank of a distributed test run, started by torchrun: `worker.py DATA RUN_DIR [OPTIONS] K=V...`.

Options: --resume, --die-at N, --fail-in-flight N, --late-rank-0 SECONDS, --finetune BASE.

It trains through the Python API, as the CLI would, then writes what the test compares and the CLI
cannot show: this rank's ALF biases (`bias-rank{R}.pt`). `--die-at N` makes rank 1 exit hard before
step N, as a crashed or killed process would; `--fail-in-flight N` makes it raise there instead, with
a collective still in flight. `--late-rank-0 S` makes rank 0 check a sharded checkpoint S seconds after
the other ranks, as a loaded machine may: a refusal they all meet must still be said (by rank 0).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from darkhorse.cli import report_failure
from darkhorse.config import load_run_config
from darkhorse.train.run_dir import plan_run
from darkhorse.train.trainer import Trainer, TrainingHooks


class DieAt(TrainingHooks):
    def __init__(self, step: int) -> None:
        self.die_step = step

    def before_step(self, trainer: Trainer) -> None:
        if trainer.step == self.die_step and trainer.world.rank == 1:
            os._exit(9)


class FailInFlight(TrainingHooks):
    """Rank 1 raises before step N with a collective of its own still in flight, which no peer joins:
    what a rank failing inside backward leaves behind (DDP's gradient all-reduce)."""

    def __init__(self, step: int) -> None:
        self.fail_step = step
        self.side_group = None

    def on_start(self, trainer: Trainer) -> None:
        self.side_group = dist.new_group([0, 1])  # every rank must create it

    def before_step(self, trainer: Trainer) -> None:
        if trainer.step == self.fail_step and trainer.world.rank == 1:
            dist.all_reduce(torch.ones(4), group=self.side_group, async_op=True)
            raise RuntimeError("injected failure with a collective in flight")


def delay_shard_check(seconds: float) -> None:
    from darkhorse.train import sharded

    check = sharded.check_shards

    def late_check(folder: Path) -> None:
        time.sleep(seconds)
        check(folder)

    sharded.check_shards = late_check


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the tests' torchrun() asks for stacks on a hang
    data, run_dir, *rest = argv
    resume = "--resume" in rest
    die_at = int(rest[rest.index("--die-at") + 1]) if "--die-at" in rest else None
    fail_at = int(rest[rest.index("--fail-in-flight") + 1]) if "--fail-in-flight" in rest else None
    overrides = [item for item in rest if "=" in item]
    if "--late-rank-0" in rest and os.environ.get("RANK") == "0":
        delay_shard_check(float(rest[rest.index("--late-rank-0") + 1]))
    if "--finetune" in rest:  # LoRA on the base checkpoint that follows, `data` a raw chat file
        from darkhorse.finetune.run import finetune

        base = rest[rest.index("--finetune") + 1]
        finetune(base, [data], run_dir, overrides=overrides, verbose=False)
        return 0
    try:
        config = load_run_config("tiny-cpu", overrides=overrides)
        plan = plan_run(config, [] if resume else [(Path(data), 1.0)], run_dir, resume=resume or None)
        hooks = DieAt(die_at) if die_at is not None else FailInFlight(fail_at) if fail_at is not None else None
        trainer = Trainer(plan, verbose=False, hooks=hooks)
        trainer.run()
    except Exception as exc:  # said and left as the CLI does: once per run, at once while the group is up
        return report_failure(exc)
    biases = {name: buf for name, buf in trainer.model.named_buffers() if name.endswith("e_score_correction_bias")}
    torch.save(biases, Path(run_dir) / f"bias-rank{trainer.world.rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
