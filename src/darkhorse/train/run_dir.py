"""Run directories and resume policy: where a run starts from, and what it may change on resume.

`plan_run` turns a request (config, data, run dir, resume / init-from / force) into a `RunPlan`:
the checkpoint to resume or start from, the opened data sources and the config the run will
really use (vocabulary from the data or the checkpoint; a resumed run's saved config). It also
refuses to clobber an earlier run without --force. `base_config` gives the CLI the config a
resumed or init-from run builds on, under the same rules and error messages.

`claimed_run_dir` holds a run dir for the length of one run: an flock on RUN_DIR/.lock keeps a second
`train`/`finetune` out (it names the holder's pid; the kernel drops the lock of a killed run, so a
stale lock file is simply taken over), leftovers of killed saves and prunes are cleared, and a run that
fails before writing anything removes the dir it created. Resume takes the newest intact checkpoint:
a torn one (see `checkpoint.damage`) is reported and skipped. metrics.jsonl is cut back to the
checkpoint's step (a torn last line, from a kill mid-write, is dropped), and a fresh start in a dir
whose run never saved a checkpoint drops that run's records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darkhorse import checkpoint as ckpt
from darkhorse.config import RunConfig, run_config_from_dict
from darkhorse.data.loader import open_sources
from darkhorse.data.prepared import PreparedData
from darkhorse.errors import DarkhorseError
from darkhorse.files import remove_dir
from darkhorse.train.dashboard import METRICS_FILE

LOCK_FILE = ".lock"

# train.* keys a resumed run may change; anything else would make it a different run.
RESUMABLE_KEYS = (
    "max_steps",
    "minutes",
    "min_steps",
    "eval_interval",
    "eval_steps",
    "save_interval",
    "keep_last",
    "log_interval",
    "device",
    "compile",
    "kernels",
    "max_bad_steps",
)


@dataclass
class RunPlan:
    """Everything a `Trainer` needs to know about where its run starts."""

    config: RunConfig  # the config the run uses (resolved vocabulary; a resumed run's own)
    run_dir: Path
    sources: list[tuple[PreparedData, float]]
    resume_from: Path | None = None  # checkpoint to continue: weights, optimizer, RNG, step
    init_from: Path | None = None  # checkpoint whose weights start a new run
    origin: str | None = None  # the init-from checkpoint a run (resumed or not) started from
    origin_step: int = 0  # that checkpoint's step


def check_run_flags(resume: bool | Path | None, init_from: Path | None, force: bool) -> None:
    if resume and force:
        raise DarkhorseError("--resume and --force contradict each other: choose one")
    if resume and init_from:
        raise DarkhorseError("--resume and --init-from contradict each other: a resumed run keeps its weights")


def find_resume_checkpoint(run_dir: Path, resume: bool | Path, *, report: bool = False) -> Path:
    """The newest intact resumable checkpoint in `run_dir` for `resume=True` (with `report`, each
    damaged one skipped is said on stderr), else the given folder, checked."""
    if resume is not True:
        folder = Path(resume)
        if not (folder / ckpt.STATE_FILE).is_file():
            raise DarkhorseError(f"--resume {folder}: not a resumable checkpoint (no {ckpt.STATE_FILE})")
        if problem := ckpt.damage(folder):
            raise DarkhorseError(f"--resume {folder}: the checkpoint is damaged ({problem})")
        return folder
    candidates = ckpt.resumable_checkpoints(run_dir)
    for folder in candidates:
        problem = ckpt.damage(folder)
        if problem is None:
            return folder
        if report:
            print(f"warning: {folder} is damaged ({problem}); trying the checkpoint before it", file=sys.stderr)
    if candidates:
        raise DarkhorseError(f"--resume: every checkpoint in {run_dir} is damaged; start over with --force")
    raise DarkhorseError(f"--resume: {run_dir} holds no checkpoint to resume from")


def base_config(
    run_dir: Path, resume: bool | Path | None, init_from: Path | None, force: bool = False
) -> dict[str, Any] | None:
    """The config a run builds on before presets and overrides: a resumed run's saved config, the
    train section of the `init_from` checkpoint, or None for a new run."""
    check_run_flags(resume, init_from, force)
    if resume:
        return ckpt.read_meta(find_resume_checkpoint(Path(run_dir), resume))["config"]
    if init_from:
        return {"train": ckpt.read_meta(init_from)["config"]["train"]}
    return None


def check_resume_config(requested: RunConfig, saved: RunConfig, checkpoint: Path) -> RunConfig:
    """The saved config with the resumable train keys taken from `requested`; other changes are errors."""
    saved_dict, requested_dict = saved.to_dict(), requested.to_dict()
    for key in RESUMABLE_KEYS:
        saved_dict["train"][key] = requested_dict["train"][key]
    changed = [
        f"{section}.{key}"
        for section in ("model", "train")
        for key in saved_dict[section]
        if saved_dict[section][key] != requested_dict[section][key]
    ]
    if changed:
        raise DarkhorseError(
            f"{', '.join(changed)} differ from the checkpoint {checkpoint}; a resumed run keeps its config "
            f"(only train.{', train.'.join(RESUMABLE_KEYS)} may change)"
        )
    return run_config_from_dict(saved_dict)


def _init_config(config: RunConfig, init_from: Path, data: PreparedData) -> tuple[RunConfig, dict[str, Any]]:
    """`config` with the model of checkpoint `init_from`, whose tokenizer must be the one of `data`."""
    from darkhorse.data.tokenizer import Tokenizer

    if not ckpt.is_complete(init_from) or not (init_from / ckpt.MODEL_FILE).is_file():
        raise DarkhorseError(f"--init-from {init_from}: not a darkhorse checkpoint (no meta.json or model.safetensors)")
    meta = ckpt.read_meta(init_from)
    model_config = run_config_from_dict(meta["config"]).model
    tokenizer_file = init_from / ckpt.TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise DarkhorseError(f"--init-from {init_from}: has no {ckpt.TOKENIZER_FILE}, so the data cannot be checked")
    if Tokenizer.from_file(tokenizer_file).sha256 != data.tokenizer_sha256:
        raise DarkhorseError(
            f"--data {data.path} was prepared with another tokenizer than --init-from {init_from} uses; "
            f"prepare it with `darkhorse prepare --tokenizer {tokenizer_file}`"
        )
    if data.vocab_size > model_config.vocab_size:
        raise DarkhorseError(
            f"--data {data.path} has vocab_size {data.vocab_size}, more than the model of {init_from} "
            f"({model_config.vocab_size})"
        )
    return dataclasses.replace(config, model=model_config), meta


def _start_fresh(run_dir: Path, force: bool) -> None:
    """Refuse to clobber an earlier run unless forced; when forced, clear its checkpoints and logs."""
    old = [*ckpt.training_checkpoints(run_dir), run_dir / ckpt.FINAL_NAME]
    old = [p for p in old if p.exists()]
    if old and not force:
        raise DarkhorseError(
            f"{run_dir} already holds a run ({old[-1].name}); pass --resume to continue it, "
            "--force to start over (deletes its checkpoints), or choose another --out"
        )
    if os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 clears the old run for every rank
        for folder in old:
            remove_dir(folder)
    # without a checkpoint an earlier run cannot be resumed: its records would mix with this run's
    for name in (METRICS_FILE, "loss.png"):
        (run_dir / name).unlink(missing_ok=True)


def plan_run(
    config: RunConfig,
    data: list[tuple[Path, float]],
    run_dir: str | Path,
    resume: bool | Path | None = None,
    *,
    init_from: str | Path | None = None,
    force: bool = False,
) -> RunPlan:
    """Prepare `run_dir` for a run and work out its start (see `train` for the arguments)."""
    init_from = Path(init_from) if init_from else None
    check_run_flags(resume, init_from, force)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.remove_stale_temp_dirs(run_dir)
    resume_from = find_resume_checkpoint(run_dir, resume, report=True) if resume else None
    if resume_from is None:
        _start_fresh(run_dir, force)
    saved_meta = ckpt.read_meta(resume_from) if resume_from else {}
    if resume_from and not data:
        data = [(Path(item["path"]), float(item["weight"])) for item in saved_meta.get("data", [])]

    sources = open_sources(data, vocab_size=config.model.vocab_size)
    first = sources[0][0]
    init_meta: dict[str, Any] = {}
    if init_from:
        config, init_meta = _init_config(config, init_from, first)
    else:
        # the data decides the vocabulary (the preset's vocab_size only sizes a tokenizer `prepare` trains);
        # a resumed run keeps its own, which an --init-from run took from its checkpoint
        saved_vocab = run_config_from_dict(saved_meta["config"]).model.vocab_size if resume_from else None
        model_config = dataclasses.replace(config.model, vocab_size=saved_vocab or first.vocab_size)
        routing = model_config.moe.domain_routing
        if routing != "none" and model_config.moe.n_domains < 1:
            # the prior's and the isolated groups' expert groups are one per domain of the data
            if not first.domain_names:
                raise DarkhorseError(
                    f"model.moe.domain_routing={routing} routes by domain tags, but --data {first.path} has none; "
                    "prepare it with one source per domain (or use model.moe.domain_routing=none)"
                )
            moe = dataclasses.replace(model_config.moe, n_domains=len(first.domain_names))
            model_config = dataclasses.replace(model_config, moe=moe)
        config = dataclasses.replace(config, model=model_config)
    if resume_from:
        config = check_resume_config(config, run_config_from_dict(saved_meta["config"]), resume_from)
        saved_sha = saved_meta.get("tokenizer_sha256")
        if saved_sha and saved_sha != first.tokenizer_sha256:
            raise DarkhorseError(
                f"--data {first.path} uses a different tokenizer than the run in {resume_from} was trained with"
            )
    return RunPlan(
        config=config,
        run_dir=run_dir,
        sources=sources,
        resume_from=resume_from,
        init_from=init_from,
        # an init-from run keeps naming its origin in every checkpoint, resumed or not
        origin=str(init_from.resolve()) if init_from else saved_meta.get("init_from"),
        origin_step=init_meta.get("step", 0),
    )


def read_history(run_dir: Path, up_to_step: int) -> list[dict[str, Any]]:
    """Metrics of a resumed run up to its checkpoint; later records are dropped (they get redone)."""
    metrics = run_dir / METRICS_FILE
    if not metrics.exists():
        return []
    lines = metrics.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):  # only the last line can be torn by a kill mid-write
                raise DarkhorseError(f"{metrics}:{number}: invalid JSON; fix or delete that line") from None
    kept = [r for r in records if isinstance(r, dict) and r.get("step", 0) <= up_to_step]
    temp = metrics.with_suffix(".jsonl.tmp")
    temp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(temp, metrics)
    return kept


@contextlib.contextmanager
def claimed_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """`run_dir`, created if need be and locked against other runs while the block runs (see the
    module doc). If the block fails and the dir it created holds nothing, the dir is removed."""
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 holds the dir for every rank
        yield run_dir
        return
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK_FILE, "a+")  # noqa: SIM115 (closed below, when the lock is released)
    except OSError as exc:
        raise DarkhorseError(f"--out {run_dir}: cannot use it as a run directory ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise DarkhorseError(
                f"{run_dir} is in use by another run (pid {holder}); wait for it to end or choose another --out"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        ckpt.remove_stale_temp_dirs(run_dir)
        try:
            yield run_dir
        except BaseException:
            if created and {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
                (run_dir / LOCK_FILE).unlink()
                run_dir.rmdir()
            raise
    finally:
        lock.close()
