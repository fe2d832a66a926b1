"""Multi-token prediction (DeepSeek-V3 §2.2), `model.mtp_depth` sequential modules.

Module k (1-based) at position i combines the previous depth's hidden state with the embedding of
token i+k and predicts token i+k+1:

    h'_i = eh_proj([enorm(embed(t_{i+k})) ; hnorm(h^{k-1}_i)])     embedding first, as vLLM/DeepSeek
    h^k  = block(h')                                                 same kind of block as the main model
    logits = lm_head(norm(h^k))                                      own final norm, shared embed and head

Tensors (`mtp.{k-1}.` prefix): `enorm.weight`, `hnorm.weight`, `eh_proj.weight [D, 2D]`,
`block.*` (a full decoder layer), `norm.weight` (HF/DeepSeek `shared_head.norm`). DeepSeek's
checkpoint layout puts them at `model.layers.{n_layers + k - 1}.` with copies of `embed_tokens` and
`shared_head.head`. Training uses them for a loss; inference can draft a token with module 1 for
speculative decoding (infer/speculative.py), with the block's own KV cache (`cache`, `start_pos`).
"""

from __future__ import annotations

import torch
from torch import nn

from darkhorse.config import ModelConfig
from darkhorse.model.layers import RMSNorm
from darkhorse.model.mhc import expand_streams, merge_streams


class MTPModule(nn.Module):
    def __init__(self, config: ModelConfig, block: nn.Module) -> None:
        super().__init__()
        self.enorm = RMSNorm(config.dim, config.norm_eps)
        self.hnorm = RMSNorm(config.dim, config.norm_eps)
        self.eh_proj = nn.Linear(2 * config.dim, config.dim, bias=False)
        self.block = block
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.streams = config.mhc.expansion if config.residual == "mhc" else 0

    def forward(
        self,
        previous: torch.Tensor,
        next_embeddings: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        domains: torch.Tensor | None = None,
        cache=None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """Normalised hidden state for this depth; `previous` and `next_embeddings` are aligned (b, s, D)."""
        x = self.eh_proj(torch.cat([self.enorm(next_embeddings), self.hnorm(previous)], dim=-1))
        if self.streams:
            x = merge_streams(self.block(expand_streams(x, self.streams), rope, cache, start_pos, domains))
        else:
            x = self.block(x, rope, cache, start_pos, domains)
        return self.norm(x)
