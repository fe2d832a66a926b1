"""Learning-rate schedules as multipliers of the base lr, driven by `torch.optim.lr_scheduler.LambdaLR`.

LambdaLR keeps the step count in its state dict, so a resumed run picks the schedule up exactly
where it stopped; the multiplier functions themselves are pure functions of the step.
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


def lr_multiplier(train: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the base lr for the optimizer step `step` (0-based), per `train.schedule`.

    cosine: linear warmup, then cosine to `min_lr_ratio`. wsd (warmup-stable-decay): linear warmup,
    constant until the last `wsd_decay_fraction` of the steps, then cosine to `min_lr_ratio`.
    constant: linear warmup, then flat.
    """
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


def build_schedulers(
    optimizers: list[torch.optim.Optimizer], train: TrainConfig
) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One LambdaLR per optimizer, all following the same multiplier (Muon and AdamW decay together)."""
    multiplier = lr_multiplier(train)
    return [torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier) for optimizer in optimizers]
