"""Learning-rate schedules as multipliers of the base lr, driven by `torch.optim.lr_scheduler.LambdaLR`.

LambdaLR keeps the step count in its state dict, so a resumed run picks the schedule up exactly
where it stopped; the multiplier functions are pure functions of the step, and under a time budget
(train.minutes) of the step and the seconds spent, which the checkpoint keeps too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from darkhorse.config import TrainConfig


def _cosine(progress: float, floor: float) -> float:
    """From 1 at progress 0 down to `floor` at progress 1, along half a cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_multiplier(train: TrainConfig, spent: Callable[[], float] | None = None) -> Callable[[int], float]:
    """Multiplier of the base lr for the optimizer step `step` (0-based), per `train.schedule`.

    cosine: linear warmup, then cosine to `min_lr_ratio`. wsd (warmup-stable-decay): linear warmup,
    constant until the last `wsd_decay_fraction` of the steps, then cosine to `min_lr_ratio`.
    constant: linear warmup, then flat. Under a time budget (train.minutes) the decay follows the
    share of the budget spent instead of the steps (see `budget_multiplier`); `spent()` gives the
    seconds spent so far.
    """
    if train.minutes:
        if spent is None:
            raise ValueError("a time budget (train.minutes) needs the seconds spent")
        return budget_multiplier(train, spent)
    warmup, total, floor = train.warmup_steps, train.max_steps, train.min_lr_ratio
    decay_start = warmup if train.schedule == "cosine" else total - round(train.wsd_decay_fraction * total)
    decay_start = max(decay_start, warmup)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if train.schedule == "constant" or step < decay_start:
            return 1.0
        return _cosine((step - decay_start) / max(total - 1 - decay_start, 1), floor)

    return multiplier


def budget_share(spent_s: float, steps: int, train: TrainConfig) -> float:
    """How far a time-budget run is after `steps` steps in `spent_s` seconds, from 0 to 1: the share of
    `train.minutes` spent, or of `train.min_steps` taken when that is less (the floor holds the run on
    past the clock). The run is over at 1."""
    share = spent_s / (train.minutes * 60)
    if train.min_steps:
        share = min(share, steps / train.min_steps)
    return min(share, 1.0)


def budget_multiplier(train: TrainConfig, spent: Callable[[], float]) -> Callable[[int], float]:
    """The schedule driven by wall-clock time: warmup stays in steps, the decay (cosine over the
    whole budget, wsd over its last `wsd_decay_fraction`) follows `budget_share` as it will be when
    step `step` ends, the time projected from the mean step time so far (`spent()` seconds over
    `step` steps). The decay lands on the budget's end however the machine's load moves, and the
    step that ends it runs at `min_lr_ratio`."""
    warmup, floor = train.warmup_steps, train.min_lr_ratio
    decay_start = 0.0 if train.schedule == "cosine" else 1.0 - train.wsd_decay_fraction

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = budget_share(spent() * (step + 1) / step, step + 1, train) if step else 0.0
        if train.schedule == "constant" or progress < decay_start:
            return 1.0
        return _cosine((progress - decay_start) / (1.0 - decay_start), floor)

    return multiplier


def build_schedulers(
    optimizers: list[torch.optim.Optimizer], train: TrainConfig, spent: Callable[[], float] | None = None
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One LambdaLR per optimizer, all following the same multiplier (Muon and AdamW decay together);
    `spent` as for `lr_multiplier`."""
    multiplier = lr_multiplier(train, spent)
    return [torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier) for optimizer in optimizers]
