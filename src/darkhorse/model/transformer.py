"""The one decoder-only transformer. Its blocks are chosen by `ModelConfig`, never by subclassing.

This file knows nothing about parallelism, optimizers or file formats: the trainer, the
distributed wrappers and the interop adapters work on it from the outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from darkhorse.config import ModelConfig
from darkhorse.model.attention import build_attention
from darkhorse.model.layers import RMSNorm, dense_ffn, rope_tables

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    # Named loss terms that make up `loss` (e.g. "lm", "mtp"), detached, for logging.
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = build_attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = dense_ffn(config)

    def forward(self, x, rope, cache=None, start_pos: int = 0, domains=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, start_pos)
        return x + self.ffn(self.ffn_norm(x), domains=domains)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gradient_checkpointing = False
        rotary_dim = self.layers[0].attn.rotary_dim
        cos, sin = rope_tables(rotary_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # -- initialisation -------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 * layers)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            is_residual_out = name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
            nn.init.normal_(param, mean=0.0, std=residual_std if is_residual_out else std)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def init_rope_buffers(self) -> None:
        """Recompute the non-persistent RoPE tables (after building on the meta device)."""
        cfg = self.config
        cos, sin = rope_tables(self.layers[0].attn.rotary_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        self.rope_cos = cos.to(self.embed.weight.device)
        self.rope_sin = sin.to(self.embed.weight.device)

    # -- forward --------------------------------------------------------------------------------

    def hidden_states(
        self,
        tokens: torch.Tensor,
        cache: list | None = None,
        start_pos: int = 0,
        domains: torch.Tensor | None = None,
    ) -> torch.Tensor:
        seq = tokens.shape[1]
        if start_pos + seq > self.config.max_seq_len:
            raise ValueError(f"sequence reaches position {start_pos + seq} > max_seq_len {self.config.max_seq_len}")
        rope = (self.rope_cos[start_pos : start_pos + seq], self.rope_sin[start_pos : start_pos + seq])
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, rope, layer_cache, start_pos, domains, use_reentrant=False)
            else:
                x = layer(x, rope, layer_cache, start_pos, domains)
        return self.norm(x)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: list | None = None,
        start_pos: int = 0,
        domains: torch.Tensor | None = None,
        mtp_weight: float = 0.0,
    ) -> ModelOutput:
        """Logits, and with `targets` the loss to backprop: next-token loss plus block losses.

        `mtp_weight` (train.mtp_weight) scales the multi-token-prediction loss of models that have
        MTP modules; `domains` (per-token domain ids) reach MoE routers for domain statistics.
        """
        hidden = self.hidden_states(tokens, cache, start_pos, domains)
        logits = self.lm_head(hidden)
        if targets is None:
            return ModelOutput(logits=logits)
        loss = F.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return ModelOutput(logits=logits, loss=loss, losses={"lm": loss.detach()})

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> list:
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return [layer.attn.new_cache(batch, max_len, device, dtype) for layer in self.layers]

    # -- hooks the trainer calls ----------------------------------------------------------------

    def after_optimizer_step(self, step: int) -> None:
        """Updates outside autograd (e.g. MoE balance bias) that blocks run after each step."""
        for module in self.modules():
            if module is not self and hasattr(module, "after_optimizer_step"):
                module.after_optimizer_step(step)

    def training_metrics(self) -> dict[str, float]:
        """Scalars that blocks report for the dashboard and metrics.jsonl (e.g. expert load)."""
        metrics: dict[str, float] = {}
        for module in self.modules():
            if module is not self and hasattr(module, "training_metrics"):
                metrics.update(module.training_metrics())
        return metrics

    # -- accounting -----------------------------------------------------------------------------

    def num_params(self) -> int:
        """Unique parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters one token touches: all of them, minus experts that a MoE layer leaves idle."""
        idle = sum(m.idle_params_per_token() for m in self.modules() if hasattr(m, "idle_params_per_token"))
        return self.num_params() - idle

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (active matmul params) + attention scores (PaLM appendix B)."""
        cfg = self.config
        matmul_params = self.num_active_params() - self.embed.weight.numel()
        if cfg.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()
        attention = 0
        for layer in self.layers:
            qk_dim, v_dim = layer.attn.score_dims
            attention += 6 * layer.attn.n_heads * seq_len * (qk_dim + v_dim)
        return 6 * matmul_params + attention

    def kv_cache_values_per_token(self) -> int:
        """Cached values per token across all layers (multiply by bytes per value)."""
        return sum(layer.attn.cache_values_per_token() for layer in self.layers)
