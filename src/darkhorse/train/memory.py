"""Training-memory estimates, so a config that cannot fit is flagged before the first step."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from darkhorse.config import RunConfig
from darkhorse.model.kernels import CHUNK_VALUES

GIB = 1024**3


@dataclass
class MemoryEstimate:
    weights: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations


def estimate_training_memory(config: RunConfig, num_params: int, matrix_params: int) -> MemoryEstimate:
    """Bytes per device for one micro-batch of `config`, with fp32 master weights.

    Optimizer state: AdamW keeps two fp32 moments, Muon one momentum buffer for matrices, Lion
    (as the scalar optimizer next to Muon) one.
    Activations follow Korthikanti et al. (2022) without the attention-score term, which
    SDPA's fused kernels never materialise; gradient checkpointing keeps only block inputs
    plus one block's worth. The head's fused loss (model/kernels.py) holds one chunk of fp32 logits
    and its gradient at a time, plus an fp32 head gradient.
    """
    model, train = config.model, config.train
    weights = grads = 4 * num_params
    scalar_state = 4 if train.optimizer == "muon" and train.scalar_optimizer == "lion" else 8
    matrix_state = 4 if train.optimizer == "muon" else 8
    optimizer = matrix_state * matrix_params + scalar_state * (num_params - matrix_params)
    tokens = train.batch_size * train.seq_len
    act_bytes = 2 if train.dtype in ("bf16", "fp16") else 4
    per_layer = tokens * model.dim * 17 * act_bytes  # 34 bytes/elem in 16-bit -> 17 elements
    if model.ffn == "moe":
        ratio = model.moe.experts_per_token * model.moe.moe_intermediate_size / max(model.ffn_dim, 1)
        per_layer += int(tokens * model.dim * 4 * max(ratio - 1, 0) * act_bytes)
    if train.grad_checkpointing:
        layers = model.n_layers * tokens * model.dim * act_bytes + per_layer
    else:
        layers = model.n_layers * per_layer
    vocab = model.padded_vocab_size
    logits = 2 * min(tokens, max(1, CHUNK_VALUES // vocab)) * vocab * 4 + vocab * model.dim * 4
    return MemoryEstimate(weights=weights, grads=grads, optimizer=optimizer, activations=layers + logits)


def available_memory(device: torch.device) -> int | None:
    """Bytes the training process can still use on `device`, or None where it cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        meminfo = Path("/proc/meminfo")
        if meminfo.exists():
            for line in meminfo.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def fit_warning(estimate: MemoryEstimate, available: int | None, margin: float = 1.2) -> str | None:
    """A warning when the estimate clearly exceeds what is free (by `margin`), else None."""
    if available is None or estimate.total <= available * margin:
        return None
    return (
        f"this config needs about {estimate.total / GIB:.1f} GiB to train but only {available / GIB:.1f} GiB "
        "is free; it will likely run out of memory (see `darkhorse params` for the breakdown)"
    )
