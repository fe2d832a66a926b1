"""Training-memory estimates, so a config that cannot fit is flagged before the first step."""

from __future__ import annotations

from dataclasses import dataclass

from darkhorse.config import RunConfig

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

    Optimizer state: AdamW keeps two fp32 moments, Muon one momentum buffer for matrices.
    Activations follow Korthikanti et al. (2022) without the attention-score term, which
    SDPA's fused kernels never materialise; gradient checkpointing keeps only block inputs
    plus one block's worth. Logits and their gradient are counted in fp32.
    """
    model, train = config.model, config.train
    weights = grads = 4 * num_params
    if train.optimizer == "muon":
        optimizer = 4 * matrix_params + 8 * (num_params - matrix_params)
    else:
        optimizer = 8 * num_params
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
    logits = 2 * tokens * model.padded_vocab_size * 4
    return MemoryEstimate(weights=weights, grads=grads, optimizer=optimizer, activations=layers + logits)
