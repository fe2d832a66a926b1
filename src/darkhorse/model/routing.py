"""Routing statistics of MoE models: expert utilization, domain x expert matrices, mutual information.

The MoE layers count what they route while training (`load_total`, `domain_counts`); this module
turns those counts into the end-of-run reports (a layer x expert utilization heatmap, a domain x
expert matrix per layer as PNG and JSON) and measures how much expert choice says about a token's
domain: I(domain; expert) in bits, 0 when routing ignores the domain, at most log2(n_domains).
`compare_domain_prior` trains a model with and without `moe.domain_prior` and reports both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkhorse.model.moe import MoE


def moe_layers(model: nn.Module) -> list[MoE]:
    return [module for module in model.modules() if isinstance(module, MoE)]


def mutual_information(counts: torch.Tensor) -> float:
    """I(D; E) in bits from a [domains, experts] count matrix (rows/columns of zeros ignored)."""
    joint = counts.double() / counts.sum().clamp(min=1)
    outer = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    cells = joint > 0
    return float((joint[cells] * (joint[cells] / outer[cells]).log2()).sum())


def utilization(model: nn.Module) -> tuple[list[int], torch.Tensor]:
    """(layer ids, [layers, experts] share of each layer's routed slots) accumulated over training."""
    layers = moe_layers(model)
    loads = torch.stack([layer.load_total.cpu() for layer in layers]) if layers else torch.zeros(0, 0)
    return [layer.layer_idx for layer in layers], loads / loads.sum(-1, keepdim=True).clamp(min=1)


def domain_routing(model: nn.Module, domain_names: list[str] | None = None) -> dict[str, Any]:
    """JSON-ready domain x expert counts and mutual information per MoE layer (domains seen only)."""
    layers = moe_layers(model)
    if not layers:
        return {"domains": [], "layers": []}
    seen = torch.stack([layer.domain_counts.cpu() for layer in layers]).sum((0, 2)).nonzero().flatten().tolist()
    names = [domain_names[d] if domain_names and d < len(domain_names) else f"domain {d}" for d in seen]
    report_layers = []
    for layer in layers:
        counts = layer.domain_counts.cpu()[seen]
        report_layers.append(
            {
                "layer": layer.layer_idx,
                "mutual_information_bits": mutual_information(counts),
                "counts": counts.long().tolist(),
            }
        )
    return {"domains": names, "domain_ids": seen, "layers": report_layers}


def write_routing_reports(run_dir: str | Path, model: nn.Module, domain_names: list[str] | None = None) -> list[Path]:
    """`expert_utilization.png`, and with domain-tagged data `domain_routing.{png,json}`; [] for dense models."""
    layer_ids, shares = utilization(model)
    if not layer_ids or shares.sum() == 0:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    written = []
    n_experts = shares.shape[1]
    figure, axes = plt.subplots(figsize=(min(3 + 0.25 * n_experts, 20), 1.5 + 0.35 * len(layer_ids)), dpi=100)
    image = axes.imshow((shares * n_experts).numpy(), aspect="auto", cmap="viridis")
    axes.set_yticks(range(len(layer_ids)), [f"layer {i}" for i in layer_ids])
    axes.set_xlabel("expert")
    axes.set_title("expert load / mean load over the run (1 = balanced)")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(run_dir / "expert_utilization.png")
    plt.close(figure)
    written.append(run_dir / "expert_utilization.png")

    report = domain_routing(model, domain_names)
    if not report["domains"]:
        return written
    (run_dir / "domain_routing.json").write_text(json.dumps(report, indent=1))
    written.append(run_dir / "domain_routing.json")
    rows = len(report["layers"])
    height = 1 + rows * (0.8 + 0.3 * len(report["domains"]))
    figure, grid = plt.subplots(rows, 1, figsize=(min(3 + 0.25 * n_experts, 20), height), dpi=100, squeeze=False)
    for axes, layer in zip(grid[:, 0], report["layers"], strict=True):
        counts = torch.tensor(layer["counts"], dtype=torch.float64)
        axes.imshow((counts / counts.sum(1, keepdim=True).clamp(min=1)).numpy(), aspect="auto", cmap="magma")
        axes.set_yticks(range(len(report["domains"])), report["domains"])
        axes.set_title(
            f"layer {layer['layer']}: share of each domain's tokens per expert, "
            f"I(domain; expert) = {layer['mutual_information_bits']:.3f} bits",
            fontsize=9,
        )
    grid[-1, 0].set_xlabel("expert")
    figure.tight_layout()
    figure.savefig(run_dir / "domain_routing.png")
    plt.close(figure)
    written.append(run_dir / "domain_routing.png")
    return written


@contextmanager
def counting_domains(model: nn.Module) -> Iterator[list[MoE]]:
    """Fresh domain counts that also accumulate in eval mode, restored afterwards."""
    layers = moe_layers(model)
    saved = [layer.domain_counts.clone() for layer in layers]
    for layer in layers:
        layer.domain_counts.zero_()
        layer.count_domains_in_eval = True
    try:
        yield layers
    finally:
        for layer, counts in zip(layers, saved, strict=True):
            layer.domain_counts.copy_(counts)
            layer.count_domains_in_eval = False


@torch.no_grad()
def measure_domain_routing(
    model: nn.Module, tokens: torch.Tensor, domains: torch.Tensor, seq_len: int, batch_size: int = 8
) -> dict[int, float]:
    """I(domain; expert) per MoE layer when `model` (in eval mode: no prior, no tags needed) reads
    `tokens` (1-D) whose per-token domain ids are `domains`; windows of `seq_len`."""
    usable = (len(tokens) // seq_len) * seq_len
    windows = tokens[:usable].view(-1, seq_len).long()
    window_domains = domains[:usable].view(-1, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with counting_domains(model) as layers:
        for start in range(0, len(windows), batch_size):
            model(
                windows[start : start + batch_size].to(device),
                domains=window_domains[start : start + batch_size].to(device),
            )
        # MoE blocks that saw no tokens (MTP modules, which inference skips) have nothing to report
        result = {
            layer.layer_idx: mutual_information(layer.domain_counts.cpu())
            for layer in layers
            if layer.domain_counts.sum() > 0
        }
    model.train(was_training)
    return result


def compare_domain_prior(config, data_dir: str | Path, out_dir: str | Path, **train_options) -> dict[str, Any]:
    """Train `config` on the prepared `data_dir` without and with `moe.domain_prior`, then measure
    I(domain; expert) per layer on the val split with tags withheld from routing (the prior is
    annealed away by the end). Returns {"without_prior": {layer: bits}, "with_prior": {...},
    "domains": names, "max_bits": log2(n_domains)}; `train_options` go to `train()`."""
    from darkhorse.checkpoint import load_model
    from darkhorse.config import load_run_config
    from darkhorse.data.prepared import open_prepared
    from darkhorse.errors import DarkhorseError
    from darkhorse.train.trainer import train

    data = open_prepared(data_dir)
    if data.domains("val") is None or not data.domain_names:
        raise DarkhorseError(f"{data_dir}: the prepared data has no domain tags, so there is no routing to compare")
    tokens = torch.from_numpy(data.tokens("val").astype("int64"))
    domains = torch.from_numpy(data.domains("val").astype("int64"))
    results: dict[str, Any] = {"domains": data.domain_names, "max_bits": math.log2(len(data.domain_names))}
    for label, prior in (("without_prior", False), ("with_prior", True)):
        overrides = [f"model.moe.n_domains={len(data.domain_names)}", f"model.moe.domain_prior={prior}"]
        run_config = load_run_config(base=config.to_dict(), overrides=overrides)
        result = train(run_config, [(Path(data_dir), 1.0)], Path(out_dir) / label, **train_options)
        model, _, _ = load_model(result.checkpoint, "cpu")
        results[label] = measure_domain_routing(model, tokens, domains, run_config.train.seq_len)
    return results
