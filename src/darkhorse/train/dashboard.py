"""What a training run shows and records: a live view, plain log lines, metrics.jsonl, loggers.

With a terminal the run gets a rich live view (progress bar and ETA, loss with a sparkline, lr,
tokens/s, MFU, memory, epoch and whatever the model reports); in CI or a pipe it prints one plain
line per log interval instead. Either way every logged record is appended to
RUN_DIR/metrics.jsonl, and to TensorBoard or Weights & Biases when asked for.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from darkhorse.errors import DarkhorseError

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"
METRICS_FILE = "metrics.jsonl"


def sparkline(values: list[float], width: int = 40) -> str:
    """The last `width` values as unicode bars, scaled between their min and max."""
    values = [v for v in values[-width:] if math.isfinite(v)]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK_BLOCKS[round((v - low) / span * (len(SPARK_BLOCKS) - 1))] for v in values)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_rate(tokens_per_s: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if tokens_per_s >= size:
            return f"{tokens_per_s / size:.1f}{unit}"
    return f"{tokens_per_s:.0f}"


def progress_text(record: dict[str, Any], max_steps: int, budget_s: float = 0.0, min_steps: int = 0) -> str:
    """`step 120/1000`; under a time budget `step 120 (2m30s of 10m00s)`, with `/cap` when max_steps caps it
    and `of at least N` when train.min_steps holds it on past the clock."""
    if not budget_s:
        return f"step {record['step']}/{max_steps}"
    cap = f"/{max_steps}" if max_steps else ""
    floor = f" of at least {min_steps}" if min_steps else ""
    return f"step {record['step']}{cap}{floor} ({format_duration(record['spent_s'])} of {format_duration(budget_s)})"


def plain_line(
    record: dict[str, Any], max_steps: int, eta_s: float | None, budget_s: float = 0.0, min_steps: int = 0
) -> str:
    """`step 120/1000 | loss 3.412 | lr 3.0e-04 | 12.3k tok/s | MFU 4.1% | mem 1.2 GiB | ETA 3m12s`."""
    parts = [
        progress_text(record, max_steps, budget_s, min_steps),
        f"loss {record['loss']:.3f}",
        f"lr {record['lr']:.1e}",
    ]
    parts.append(f"{format_rate(record['tokens_per_s'])} tok/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if record.get("memory_gib") is not None:
        parts.append(f"mem {record['memory_gib']:.1f} GiB")
    if record.get("bad_steps"):
        parts.append(f"bad steps {record['bad_steps']}")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


class ExternalLogger:
    """TensorBoard or Weights & Biases, for the scalar fields of each record."""

    def __init__(self, kind: str, run_dir: Path, config: dict[str, Any]) -> None:
        self.kind = kind
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise DarkhorseError(
                    "--logger tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        elif kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise DarkhorseError("--logger wandb needs the wandb package: pip install wandb") from None
            self.writer = wandb.init(project="darkhorse", name=run_dir.name, dir=str(run_dir), config=config)
        else:
            raise DarkhorseError(f"unknown --logger {kind!r}; use tensorboard or wandb")

    def log(self, record: dict[str, Any]) -> None:
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.kind == "tensorboard":
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, record["step"])
        else:
            self.writer.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.writer.finish()


class Dashboard:
    """Shows and records a run. `verbose=False` keeps files and loggers but prints nothing."""

    def __init__(
        self,
        run_dir: Path,
        *,
        max_steps: int,
        start_step: int,
        budget_s: float = 0.0,
        min_steps: int = 0,
        train_tokens: int,
        verbose: bool = True,
        live: bool | None = None,
        logger: ExternalLogger | None = None,
        history: Sequence[dict[str, Any]] = (),
        record: bool = True,
        log_file: Path | None = None,
    ) -> None:
        """`history`: the records a resumed run already logged, so the loss sparkline goes on where it was.
        `budget_s`: a time budget (train.minutes): progress and ETA follow the records' `spent_s`, and their
        steps too while under `min_steps` (train.min_steps).
        `record=False` writes no metrics (ranks other than 0); `log_file` also gets every printed line."""
        self.metrics_file = Path(run_dir) / METRICS_FILE
        self.record, self.log_file = record, log_file
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
        self.max_steps, self.start_step, self.train_tokens = max_steps, start_step, train_tokens
        self.budget_s, self.min_steps = budget_s, min_steps
        self.verbose, self.logger = verbose, logger
        self.live_view = None
        self.losses: list[float] = [record["loss"] for record in history if "loss" in record]
        self.latest: dict[str, Any] = {}
        self.started = time.perf_counter()
        use_live = sys.stdout.isatty() if live is None else live
        if verbose and use_live:
            from rich.console import Console
            from rich.live import Live

            self.console = Console()
            self.live_view = Live(console=self.console, refresh_per_second=4, transient=False)

    def __enter__(self) -> Dashboard:
        if self.live_view is not None:
            self.live_view.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live_view is not None:
            self.live_view.stop()
        if self.logger is not None:
            self.logger.close()

    def eta(self, record: dict[str, Any]) -> float | None:
        step = record["step"]
        if self.budget_s:
            left = self.budget_s - record["spent_s"]
            if self.min_steps and 0 < step < self.min_steps:  # the steps the floor still asks for, at this pace
                left = max(left, record["spent_s"] / step * (self.min_steps - step))
            return max(left, 0.0)
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * (self.max_steps - step)

    def _log(self, text: str) -> None:
        if self.log_file is not None:
            with self.log_file.open("a") as handle:
                handle.write(text + "\n")

    def _append(self, record: dict[str, Any]) -> None:
        if not self.record:
            return
        with self.metrics_file.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.logger is not None:
            self.logger.log(record)

    def log_record(self, record: dict[str, Any]) -> None:
        """Append a record that is neither a step nor an evaluation (e.g. a fine-tuning report)."""
        self._append(record)

    def log_step(self, record: dict[str, Any]) -> None:
        self._append(record)
        self.losses.append(record["loss"])
        self.latest = record
        line = plain_line(record, self.max_steps, self.eta(record), self.budget_s, self.min_steps)
        self._log(line)
        if not self.verbose:
            return
        if self.live_view is not None:
            self.live_view.update(self._render())
        else:
            print(line, flush=True)

    def log_eval(self, record: dict[str, Any], sample: str | None) -> None:
        self._append(record)
        parts = [f"eval step {record['step']}", f"val loss {record['val_loss']:.3f}"]
        if record.get("val_bpb") is not None:
            parts.append(f"val bpb {record['val_bpb']:.3f}")
        self.message(" | ".join(parts))
        if sample is not None:
            self.message(f"sample: {sample!r}")

    def message(self, text: str) -> None:
        self._log(text)
        if not self.verbose:
            return
        if self.live_view is not None:
            self.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def _render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        record = self.latest
        eta = self.eta(record)
        header = Table.grid(expand=True)
        header.add_column(ratio=1)
        header.add_column(justify="right")
        total, completed = (self.budget_s, record["spent_s"]) if self.budget_s else (self.max_steps, record["step"])
        if self.min_steps:  # the bar follows whichever of time and steps is less far along
            completed = min(completed, self.budget_s * record["step"] / self.min_steps)
        header.add_row(
            ProgressBar(total=total, completed=completed),
            f" {progress_text(record, self.max_steps, self.budget_s, self.min_steps)}  "
            f"ETA {format_duration(eta) if eta is not None else '-'}",
        )
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        table.add_row("loss", f"{record['loss']:.4f}  {sparkline(self.losses)}")
        table.add_row("lr", f"{record['lr']:.2e}")
        table.add_row("tokens/s", format_rate(record["tokens_per_s"]))
        if record.get("mfu") is not None:
            table.add_row("MFU", f"{100 * record['mfu']:.1f}%")
        if record.get("memory_gib") is not None:
            table.add_row("memory", f"{record['memory_gib']:.2f} GiB")
        table.add_row("epoch", f"{record['tokens_seen'] / max(self.train_tokens, 1):.3f}")
        if record.get("bad_steps"):
            table.add_row("bad steps", str(record["bad_steps"]))
        shown = {"step", "loss", "lr", "tokens_per_s", "mfu", "memory_gib", "tokens_seen", "epoch", "bad_steps"}
        for key, value in record.items():
            if key not in shown and isinstance(value, float):
                table.add_row(key, f"{value:.4g}")
        return Panel(Group(header, table), title="darkhorse train", border_style="cyan")
