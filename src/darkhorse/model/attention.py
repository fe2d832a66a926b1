"""Attention blocks. Each one owns its projections, its KV-cache layout and its RoPE use.

The shared contract: `forward(x, rope, cache=None, start_pos=0)` where `rope` is the (cos, sin)
pair already sliced to the positions of `x`, and `new_cache(batch, max_len, device, dtype)`
returns the object that `forward` fills while decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from darkhorse.config import ModelConfig
from darkhorse.model.layers import apply_rope


class KVCache:
    """Preallocated keys and values, (batch, kv_heads, max_len, head_dim) each."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, device, dtype) -> None:
        self.keys = torch.zeros(batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros(batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions, decoding reached {end}")
        self.keys[:, :, start_pos:end] = keys
        self.values[:, :, start_pos:end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """SDPA over (batch, heads, seq, dim) where the last q position lines up with the last k one.

    During decoding q covers the newest positions only, so the causal mask is offset by the
    cached length; the common cases (full sequence, or one new token) need no explicit mask.
    """
    q_len, k_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if q_len == k_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    offset = k_len - q_len
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(diagonal=offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class GroupedQueryAttention(nn.Module):
    """LLaMA/Mistral attention: n_kv_heads shared by groups of query heads, RoPE on q and k."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    @property
    def rotary_dim(self) -> int:
        return self.head_dim

    @property
    def score_dims(self) -> tuple[int, int]:
        """(query-key dim, value dim) per head, for FLOP counts."""
        return self.head_dim, self.head_dim

    def cache_values_per_token(self) -> int:
        return 2 * self.n_kv_heads * self.head_dim

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, device, dtype)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)
        out = causal_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def build_attention(config: ModelConfig) -> nn.Module:
    if config.attention == "gqa":
        return GroupedQueryAttention(config)
    raise NotImplementedError(f"attention '{config.attention}' is not built yet")
