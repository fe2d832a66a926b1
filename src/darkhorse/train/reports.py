"""End-of-run reports written next to the checkpoints (the loss curve; blocks may add more)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from darkhorse.model.routing import write_routing_reports


def write_loss_curve(path: Path, history: list[dict[str, Any]]) -> Path | None:
    """Train loss per logged step and val loss per evaluation, as a PNG; None without records."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if val:
        axes.plot(*zip(*val, strict=True), "o-", label="val loss", linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def write_run_reports(run_dir: Path, model: nn.Module, history: list[dict[str, Any]]) -> list[Path]:
    """Every report for a finished run; returns the files written."""
    written = [write_loss_curve(Path(run_dir) / "loss.png", history)]
    written += write_routing_reports(run_dir, model)  # MoE: utilization heatmap, domain x expert matrix
    return [path for path in written if path is not None]
