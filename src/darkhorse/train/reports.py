"""End-of-run reports written next to the checkpoints: the loss curve, and for MoE models the
expert utilization heatmap and the domain x expert matrices (PNG and JSON)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from darkhorse.train.routing import RoutingCounter


@contextmanager
def _figure(path: Path, figsize: tuple[float, float], rows: int = 1) -> Iterator[tuple[Any, list[Any]]]:
    """A matplotlib figure with `rows` stacked axes (no display needed), saved to `path` and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, grid = plt.subplots(rows, 1, figsize=figsize, dpi=100, squeeze=False)
    try:
        yield figure, list(grid[:, 0])
        figure.tight_layout()
        figure.savefig(path)
    finally:
        plt.close(figure)


def write_loss_curve(path: Path, history: list[dict[str, Any]]) -> Path | None:
    """Train loss per logged step and val loss per evaluation, as a PNG; None without records."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if not train and not val:
        return None
    with _figure(path, (7, 4)) as (_, [axes]):
        if train:
            axes.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
        if val:
            axes.plot(*zip(*val, strict=True), "o-", label="val loss", linewidth=1.2)
        axes.set_xlabel("step")
        axes.set_ylabel("loss (nats/token)")
        axes.grid(alpha=0.3)
        axes.legend()
    return path


def write_routing_reports(
    run_dir: Path,
    routing: RoutingCounter,
    domain_names: list[str] | None = None,
    held_out: dict[str, Any] | None = None,
) -> list[Path]:
    """`expert_utilization.png`, and with domain-tagged data `domain_routing.{png,json}` (with `held_out`,
    the routing on validation text with the tags withheld, under "held_out"); [] for dense models."""
    layer_ids, shares = routing.utilization()
    if not layer_ids or shares.sum() == 0:
        return []
    n_experts = shares.shape[1]
    width = min(3 + 0.25 * n_experts, 20)
    utilization = run_dir / "expert_utilization.png"
    with _figure(utilization, (width, 1.5 + 0.35 * len(layer_ids))) as (figure, [axes]):
        image = axes.imshow((shares * n_experts).numpy(), aspect="auto", cmap="viridis")
        axes.set_yticks(range(len(layer_ids)), [f"layer {i}" for i in layer_ids])
        axes.set_xlabel("expert")
        axes.set_title("expert load / mean load over the run (1 = balanced)")
        figure.colorbar(image, ax=axes)
    written = [utilization]

    report = routing.domain_report(domain_names)
    if not report["domains"]:
        return written
    if held_out:
        report["held_out"] = held_out
    (run_dir / "domain_routing.json").write_text(json.dumps(report, indent=1))
    written.append(run_dir / "domain_routing.json")
    rows = len(report["layers"])
    # wide enough for the domain names and the colour bar; titles short enough for the narrowest panel
    height = 1.2 + rows * (0.9 + 0.3 * len(report["domains"]) + 0.2 * bool(held_out))
    with _figure(run_dir / "domain_routing.png", (max(width, 6.0), height), rows) as (figure, grid):
        figure.suptitle("share of each domain's routed slots per expert, in training", fontsize=10)
        withheld = {row["layer"]: row for row in (held_out or {}).get("layers", [])}
        for axes, layer in zip(grid, report["layers"], strict=True):
            counts = torch.tensor(layer["counts"], dtype=torch.float64)
            shares = (counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy()
            image = axes.imshow(shares, aspect="auto", cmap="magma", vmin=0.0)
            axes.set_yticks(range(len(report["domains"])), report["domains"])
            axes.set_xticks(range(n_experts))
            title = f"layer {layer['layer']}: I(domain; expert) = {layer['mutual_information_bits']:.3f} bits"
            if layer["layer"] in withheld:  # what routing knows without the tags
                share = withheld[layer["layer"]]["share_of_domain_entropy"]
                title += f"\nheld out, tags withheld: {share:.0%} of H(domain)"
            axes.set_title(title, fontsize=9)
            figure.colorbar(image, ax=axes, fraction=0.05, pad=0.02)
        grid[-1].set_xlabel("expert")
    written.append(run_dir / "domain_routing.png")
    return written


def write_run_reports(
    run_dir: Path,
    history: list[dict[str, Any]],
    routing: RoutingCounter,
    domain_names: list[str] | None = None,
    held_out: dict[str, Any] | None = None,
) -> list[Path]:
    """Every report for a finished run; returns the files written (the trainer names them all)."""
    written = [write_loss_curve(Path(run_dir) / "loss.png", history)]
    # MoE: utilization heatmap, domain x expert matrix
    written += write_routing_reports(Path(run_dir), routing, domain_names, held_out)
    return [path for path in written if path is not None]


def write_load_heatmaps(path: Path, layer_ids: list[int], panels: list[tuple[str, torch.Tensor]]) -> Path | None:
    """One heatmap per (title, [layers, experts] shares) panel, in load / mean load (1 = balanced)."""
    if not layer_ids or not panels:
        return None
    n_experts = panels[0][1].shape[1]
    width = min(3 + 0.25 * n_experts, 20)
    with _figure(path, (width, len(panels) * (1.2 + 0.35 * len(layer_ids))), rows=len(panels)) as (figure, grid):
        for axes, (title, shares) in zip(grid, panels, strict=True):
            image = axes.imshow((shares * n_experts).numpy(), aspect="auto", cmap="viridis", vmin=0)
            axes.set_yticks(range(len(layer_ids)), [f"layer {i}" for i in layer_ids])
            axes.set_title(title, fontsize=9)
            figure.colorbar(image, ax=axes)
        grid[-1].set_xlabel("expert")
    return path


def write_accuracy_chart(path: Path, series: dict[str, dict[str, float]], title: str = "accuracy") -> Path:
    """Grouped bars: one group per task, one bar per model (`series`: model label -> task -> accuracy 0..1)."""
    tasks = list(dict.fromkeys(task for bars in series.values() for task in bars))
    width = 0.8 / max(1, len(series))
    with _figure(path, (min(3 + 0.9 * len(tasks) * max(1, len(series)), 20), 4)) as (_, [axes]):
        for index, (label, bars) in enumerate(series.items()):
            positions = [k + (index - (len(series) - 1) / 2) * width for k in range(len(tasks))]
            axes.bar(positions, [100 * bars.get(task, 0.0) for task in tasks], width, label=label)
        axes.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        axes.set_ylabel("accuracy (%)")
        axes.set_ylim(0, 100)
        axes.set_title(title)
        axes.grid(axis="y", alpha=0.3)
        if len(series) > 1:
            axes.legend()
    return path
