"""Our Muon's step (expert stacks as one batched Newton-Schulz each) against torch.optim.Muon stepping
the same matrices one by one (each expert of a stack a 2-D parameter of its own), on a preset's
hidden matrices with random gradients.

The two optimizers take turns in one process, timed in process CPU time (1 thread), median of
--repeats steps each; the updates agree (a matrix bit for bit, a stack up to bf16 rounding).

    .venv/bin/python bench/bench_muon.py                          # genesis-tiny
    .venv/bin/python bench/bench_muon.py --preset tiny-cpu
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from darkhorse.config import load_run_config
from darkhorse.model import Transformer
from darkhorse.train.optim import Muon, split_parameters


def cpu_seconds(step) -> float:
    start = time.process_time()
    step()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="genesis-tiny")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    hidden, _, _, _ = split_parameters(Transformer(load_run_config(args.preset).model))
    options = {"lr": 0.02, "weight_decay": 0.1, "adjust_lr_fn": "original"}
    ours = [nn.Parameter(p.detach().clone()) for p in hidden]
    theirs = [nn.Parameter(m.clone()) for p in hidden for m in (p.detach().unbind(0) if p.ndim == 3 else [p.detach()])]
    for param in [*ours, *theirs]:
        param.grad = torch.randn_like(param) * 1e-3
    optimizers = {"darkhorse Muon": Muon(ours, **options), "torch Muon": torch.optim.Muon(theirs, **options)}
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.repeats + 1):  # the first step of each allocates its momentum: not timed
        for name, optimizer in optimizers.items():
            times[name].append(cpu_seconds(optimizer.step))
    stacks = sum(p.ndim == 3 for p in hidden)
    print(f"{args.preset}: {len(hidden)} hidden parameters ({stacks} expert stacks), {len(theirs)} matrices for torch")
    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    for name, median in medians.items():
        print(f"{name}: {1000 * median:.1f} ms CPU per step")
    print(f"torch / darkhorse: {medians['torch Muon'] / medians['darkhorse Muon']:.2f}x")


if __name__ == "__main__":
    main()
