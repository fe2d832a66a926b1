"""Attention blocks. Each one owns its projections, its KV-cache layout and its RoPE use.

The shared contract: `forward(x, rope, cache=None, start_pos=0)` where `rope` is the (cos, sin)
pair already sliced to the positions of `x`, and `new_cache(batch, max_len, device, dtype)`
returns the object that `forward` fills while decoding. `start_pos` is one int for the whole batch,
or a (batch,) tensor of each row's own first position (continuous batching: rows at different
points of their sequences decode together, each attending to its own cached positions only).

MLA (`model.attention: mla`) uses HF DeepseekV3's tensor names and layouts, so the HF exporter
renames `layers.{i}.attn.X` to `model.layers.{i}.self_attn.X` and nothing else:

    q_proj [nh*(dn+dr), D]               when q_lora_rank = 0, else
    q_a_proj [cq, D], q_a_layernorm [cq], q_b_proj [nh*(dn+dr), cq]   rows per head: [nope | rope]
    kv_a_proj_with_mqa [c+dr, D]         rows: [latent c | shared rope key dr]
    kv_a_layernorm [c]                   on the latent only
    kv_b_proj [nh*(dn+dv), c]            rows per head: [k_nope | v]
    o_proj [D, nh*dv]

The rope rows of `q_b_proj`/`q_proj` and `kv_a_proj_with_mqa` hold interleaved pairs (x0,x1),
(x2,x3)... as DeepSeek's checkpoints, llama.cpp's deepseek2 and HF's `rope_interleave: true` expect;
we rotate each pair where it lies (`rotate_pairs`: transformers de-interleaves first, then rotates the
halves, which gives the same scores), so both exporters copy these rows unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from darkhorse.config import ModelConfig
from darkhorse.model.layers import RMSNorm, apply_rope_pair, rotate_pairs, yarn_mscale


def row_positions(start_pos: torch.Tensor, seq: int) -> torch.Tensor:
    """(batch, seq) positions of `seq` new tokens per row, each row from its own `start_pos`."""
    return start_pos[:, None] + torch.arange(seq, device=start_pos.device)


class RowCache:
    """Preallocated cache tensors, batch first (`FIELDS` names them), written at one position for the whole
    batch or at each row's own. Rows can be viewed and moved, so a continuous batch keeps its live rows
    first and runs a step over just those."""

    FIELDS: tuple[str, ...] = ()

    def _write(self, name: str, new: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        """Write `new` (batch, heads, seq, dim) at the positions; return the cache up to the last one written."""
        stored = getattr(self, name)
        seq = new.shape[2]
        if isinstance(start_pos, torch.Tensor):
            positions = row_positions(start_pos, seq)
            end = int(positions.max()) + 1
            if end > stored.shape[2]:
                raise ValueError(f"KV cache holds {stored.shape[2]} positions, decoding reached {end}")
            rows = torch.arange(len(positions), device=positions.device)[:, None]
            stored[rows, :, positions] = new.transpose(1, 2)  # indexed dims first: (batch, seq, heads, dim)
        else:
            end = start_pos + seq
            if end > stored.shape[2]:
                raise ValueError(f"KV cache holds {stored.shape[2]} positions, decoding reached {end}")
            stored[:, :, start_pos:end] = new
        return stored[:, :, :end]

    def rows(self, start: int, stop: int) -> RowCache:
        """A cache of rows start..stop-1 that shares this one's memory."""
        view = copy.copy(self)
        for name in self.FIELDS:
            setattr(view, name, getattr(self, name)[start:stop])
        return view

    def move_row(self, source: int, target: int) -> None:
        for name in self.FIELDS:
            stored = getattr(self, name)
            stored[target] = stored[source]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.FIELDS)


class KVCache(RowCache):
    """Preallocated keys and values, (batch, kv_heads, max_len, head_dim) each."""

    FIELDS = ("keys", "values")

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, device, dtype) -> None:
        self.keys = torch.zeros(batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros(batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, start_pos: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._write("keys", keys, start_pos), self._write("values", values, start_pos)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    start_pos: int | torch.Tensor = 0,
) -> torch.Tensor:
    """SDPA over (batch, heads, seq, dim) where the last q position lines up with the last k one.

    During decoding q covers the newest positions only, so the causal mask is offset by the
    cached length; the common cases (full sequence, or one new token) need no explicit mask.
    With per-row positions (a `start_pos` tensor) each row sees its own cached positions only.
    """
    q_len, k_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if isinstance(start_pos, torch.Tensor):
        seen = torch.arange(k_len, device=q.device) <= row_positions(start_pos, q_len)[..., None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=seen[:, None], scale=scale, enable_gqa=gqa)
    if q_len == k_len:
        if _sdpa_takes_its_math_path(q, v, gqa):
            return _masked_softmax_attention(q, k, v, scale)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if q_len == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    offset = k_len - q_len
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(diagonal=offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _sdpa_takes_its_math_path(q: torch.Tensor, v: torch.Tensor, gqa: bool) -> bool:
    """fp32 on CPU with q and v head dims unequal (MLA): SDPA's CPU flash kernel needs them equal."""
    cpu_fp32 = q.dtype == torch.float32 and q.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
    return cpu_fp32 and not gqa and q.shape[-1] != v.shape[-1]


def _masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention as softmax(q k^T * scale + mask) v in three ops, where SDPA would take its math path:
    that scales q and k apart, builds the mask and runs a softmax that checks for fully masked rows, three
    more passes over the [batch, heads, seq, seq] scores each way (~20% of the attention's time at the
    demo's shapes)."""
    batch, heads, seq, dim = q.shape
    mask = torch.full((seq, seq), float("-inf"), device=q.device, dtype=q.dtype).triu_(1)
    scores = torch.baddbmm(
        mask, q.reshape(-1, seq, dim), k.reshape(-1, seq, dim).transpose(1, 2), alpha=scale or dim**-0.5
    )
    return torch.bmm(scores.softmax(-1), v.reshape(-1, seq, v.shape[-1])).view(batch, heads, seq, -1)


class GroupedQueryAttention(nn.Module):
    """LLaMA/Mistral attention: n_kv_heads shared by groups of query heads, RoPE on q and k."""

    kernels = "torch"  # RoPE's (model/kernels.py)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

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
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None = None,
        start_pos: int | torch.Tensor = 0,
        value_embed: torch.Tensor | None = None,
        kv_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`value_embed`: (batch, seq, n_kv_heads * head_dim) added to the values (model.value_embeds);
        `kv_input`: what keys and values are computed from, where not `x` (model.smear=kv)."""
        batch, seq, _ = x.shape
        kv_x = x if kv_input is None else kv_input
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kv_x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv_x) if value_embed is None else self.v_proj(kv_x) + value_embed
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # None: the model adds learned absolute positions to its inputs instead
            q, k = apply_rope_pair(q, k, *rope, self.kernels)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)
        out = causal_attention(q, k, v, start_pos=start_pos)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class LatentCache(RowCache):
    """MLA's decoding cache: per token only [kv_norm(c_kv) | roped k_pe], (batch, 1, max_len, c + dr); k_pe in
    the interleaved order of its weight rows, or half-split with liger's kernels (queries are rotated alike).

    Read as one shared key head, its first c channels are also the shared value head.
    """

    FIELDS = ("entries",)

    def __init__(self, batch: int, max_len: int, width: int, device, dtype) -> None:
        self.entries = torch.zeros(batch, 1, max_len, width, device=device, dtype=dtype)

    def update(self, entries: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
        return self._write("entries", entries, start_pos)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): interleaved RoPE pairs to half-split."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 attention: keys and values rebuilt per head from one small latent.

    Training and cache-free calls use the direct form (decompress K and V). With a cache, W_UK is
    absorbed into the queries and W_UV applied after attention, so attention runs as one-head
    MQA over the cached [latent | rope key] entries and the cache never holds per-head K or V.
    """

    kernels = "torch"  # RoPE's (model/kernels.py)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        mla = config.mla
        self.n_heads = config.n_heads
        self.nope_dim, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.latent_dim = mla.kv_lora_rank
        q_head_dim = self.nope_dim + self.rope_dim
        if mla.q_lora_rank:
            self.q_a_proj = nn.Linear(config.dim, mla.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, config.norm_eps)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, self.n_heads * q_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(config.dim, self.n_heads * q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.dim, self.latent_dim + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, config.norm_eps)
        self.kv_b_proj = nn.Linear(self.latent_dim, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, config.dim, bias=False)
        scaling = config.rope_scaling
        mscale = yarn_mscale(scaling.factor, scaling.mscale_all_dim) if scaling.type == "yarn" else 1.0
        self.softmax_scale = q_head_dim**-0.5 * mscale**2

    @property
    def rotary_dim(self) -> int:
        return self.rope_dim

    @property
    def score_dims(self) -> tuple[int, int]:
        return self.nope_dim + self.rope_dim, self.v_dim

    def cache_values_per_token(self) -> int:
        return self.latent_dim + self.rope_dim

    def uncompressed_cache_values_per_token(self) -> int:
        """What caching the decompressed per-head K and V (attention of the same width) would take."""
        return self.n_heads * (self.nope_dim + self.rope_dim + self.v_dim)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> LatentCache:
        return LatentCache(batch, max_len, self.latent_dim + self.rope_dim, device, dtype)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def _rope(
        self, q_rope: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rope channels rotated. Scores need q and k rotated alike, not in any channel order, so the torch
        path rotates the pairs where they lie (no de-interleaving copies: ~5% of a CPU demo step); liger's
        kernel takes the half-split order."""
        if self.kernels == "liger":
            return apply_rope_pair(deinterleave(q_rope), deinterleave(k_rope), cos, sin, self.kernels)
        return rotate_pairs(q_rope, cos, sin), rotate_pairs(k_rope, cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LatentCache | None = None,
        start_pos: int | torch.Tensor = 0,
        kv_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`kv_input`: what the latent and the rope key are computed from, where not `x` (model.smear=kv)."""
        batch, seq, _ = x.shape
        cos, sin = rope
        q = self._queries(x).view(batch, seq, self.n_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x if kv_input is None else kv_input).split(
            [self.latent_dim, self.rope_dim], dim=-1
        )
        latent = self.kv_a_layernorm(latent).unsqueeze(1)  # (batch, 1, seq, c)
        q_rope, k_rope = self._rope(q_rope, k_rope.unsqueeze(1), cos, sin)  # the rope key: one head for all
        if cache is None:
            kv = self.kv_b_proj(latent.squeeze(1)).view(batch, seq, self.n_heads, -1).transpose(1, 2)
            k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)
            out = causal_attention(torch.cat([q_nope, q_rope], dim=-1), k, v, scale=self.softmax_scale)
        else:
            entries = cache.update(torch.cat([latent, k_rope], dim=-1), start_pos)
            w_uk, w_uv = self.kv_b_proj.weight.view(self.n_heads, -1, self.latent_dim).split(
                [self.nope_dim, self.v_dim], dim=1
            )
            q_latent = torch.einsum("bhsd,hdc->bhsc", q_nope, w_uk)
            values = entries[..., : self.latent_dim]
            out_latent = causal_attention(
                torch.cat([q_latent, q_rope], dim=-1), entries, values, scale=self.softmax_scale, start_pos=start_pos
            )
            out = torch.einsum("bhsc,hdc->bhsd", out_latent, w_uv)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def build_attention(config: ModelConfig) -> nn.Module:
    if config.attention == "mla":
        return MultiHeadLatentAttention(config)
    return GroupedQueryAttention(config)
