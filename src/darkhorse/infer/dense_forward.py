"""The decode engine's forward step for plain dense GQA models: the same computation as `Transformer.forward`
with a KV cache, restated with fewer, larger tensor ops.

At decoding sizes (a few rows, one new token each) a step is dozens of small kernels, and the per-op
dispatch and the module calls cost as much as the arithmetic. So, for one `Engine.decode` call:

- each layer's q/k/v projections are one matmul and gate/up another, against weights concatenated and
  stored transposed once per call (x @ W runs faster than `F.linear` at these shapes), with the RMSNorm
  weight before them folded in, and sqrt(dim) too: RMSNorm's x / sqrt(mean(x^2) + eps) is then
  x / sqrt(x.x + dim * eps), a dot product (`vecdot`, one kernel) instead of square, mean and add; the
  residual adds ride in `addmm`;
- RoPE turns q and k in one complex product (each half-split pair of channels stored side by side);
- keys and values go into preallocated caches, in place;
- one new token attends with its query heads as rows of its KV head (GQA as a plain SDPA call);
- the output head runs on the last position only, over the tokenizer's ids only.

Every formula is the model's; only the order of float operations differs (grouped and folded matmuls, the
RoPE channel order inside q.k), so logits agree with `Transformer.forward`'s to float rounding
(tests/infer/test_dense_forward.py; tests/infer/test_engine.py holds the greedy tokens equal to a cache-free
recompute). Training never comes here: it runs `Transformer.forward`, unchanged. Other models (MLA, MoE,
mHC, qk-norm, attention biases, non-fp32 weights, LoRA layers, hooks, anything that is not a plain
`Transformer`) decode through their own forward (`ModelForward`).

Measured (bench/bench_eval.py, docs/benchmarks.md "Eval throughput"): a left-padded one-call prefill of
ragged prompts with a per-row pad mask was slower than feeding the longer prompts' tails token by token
(the masked SDPA costs more per step than the ~3% of steps it saves), and attention as two matmuls was no
faster than SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from darkhorse.model import Transformer
from darkhorse.model.attention import GroupedQueryAttention, causal_attention
from darkhorse.model.layers import RMSNorm, SwiGLU
from darkhorse.model.transformer import Block


class ModelForward:
    """Any model's step: `Transformer.forward` with the model's own caches."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, vocab_size: int) -> None:
        self.model = model
        self.cache = model.new_cache(batch, max_len)
        self.vocab_size = vocab_size

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits (batch, vocab_size) of the last position of `tokens` (batch, seq) placed at `start_pos`."""
        logits = self.model(tokens, cache=self.cache, start_pos=start_pos).logits
        return logits[:, -1, : self.vocab_size]


class DenseForward:
    """The dense GQA step (see the module docstring); build one per decode call, as weights may change."""

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether `model` computes exactly what this step restates: a `Transformer` of plain dense GQA
        blocks, fp32, every module of its own class (no LoRA or other subclass) and no hooks on any."""
        if type(model) is not Transformer:
            return False
        config = model.config
        if (
            config.attention != "gqa"
            or config.ffn != "dense"
            or config.residual != "plain"
            or config.attention_bias
            or config.qk_norm
            or (config.ffn_activation, config.positions, config.logit_softcap) != ("swiglu", "rope", 0.0)
        ):
            return False
        if any(p.dtype != torch.float32 for p in model.parameters()):
            return False
        if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
            return False
        if _global_forward_hooks or _global_forward_pre_hooks:
            return False
        kinds = [(model.embed, nn.Embedding), (model.norm, RMSNorm), (model.lm_head, nn.Linear)]
        for block in model.layers:
            attn, ffn = block.attn, block.ffn
            kinds += [(block, Block), (block.attn_norm, RMSNorm), (block.ffn_norm, RMSNorm)]
            kinds += [(attn, GroupedQueryAttention), (ffn, SwiGLU)]
            kinds += [(attn.q_proj, nn.Linear), (attn.k_proj, nn.Linear), (attn.v_proj, nn.Linear)]
            kinds += [(attn.o_proj, nn.Linear), (ffn.gate_proj, nn.Linear), (ffn.up_proj, nn.Linear)]
            kinds += [(ffn.down_proj, nn.Linear)]
        return all(type(module) is kind for module, kind in kinds) and all(
            module.bias is None for module, kind in kinds if kind is nn.Linear
        )

    def __init__(self, model: Transformer, batch: int, max_len: int, vocab_size: int) -> None:
        config = model.config
        self.embed = model.embed.weight
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.ffn_dim = config.ffn_dim
        half = self.head_dim // 2
        # RoPE as a complex product: channel i of a head and channel i + half (the half-split pair) are
        # stored side by side, as the real and imaginary part of one number, in q and k (weights' rows
        # permuted; the cached keys keep that order, and q.k sums the same products in another order).
        self.rotation = torch.complex(model.rope_cos[:, :half], model.rope_sin[:, :half])
        pairs = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
        self.half = half
        self.layers = []
        device, dtype = self.embed.device, self.embed.dtype
        for block in model.layers:
            attn, ffn = block.attn, block.ffn
            q_w = attn.q_proj.weight.view(self.n_heads, self.head_dim, -1)[:, pairs].flatten(0, 1)
            k_w = attn.k_proj.weight.view(self.n_kv_heads, self.head_dim, -1)[:, pairs].flatten(0, 1)
            qkv = torch.cat([q_w, k_w, attn.v_proj.weight])
            gate_up = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight])
            shape = (batch, self.n_kv_heads, max_len, self.head_dim)
            self.layers.append(
                (
                    self._eps(block.attn_norm.eps),
                    _fold(block.attn_norm.weight, qkv),
                    attn.o_proj.weight.t().contiguous(),
                    self._eps(block.ffn_norm.eps),
                    _fold(block.ffn_norm.weight, gate_up),
                    ffn.down_proj.weight.t().contiguous(),
                    torch.empty(shape, device=device, dtype=dtype),
                    torch.empty(shape, device=device, dtype=dtype),
                )
            )
        self.norm_eps = self._eps(model.norm.eps)
        self.head = _fold(model.norm.weight, model.lm_head.weight[:vocab_size])
        self.max_len = max_len

    def _eps(self, eps: float) -> torch.Tensor:
        """A norm's eps times dim, as a tensor (adding a Python float costs a scalar wrap per call)."""
        return torch.tensor(eps * self.embed.shape[1], device=self.embed.device, dtype=self.embed.dtype)

    @staticmethod
    def _normalize(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """RMSNorm times 1/sqrt(dim), before its weight (both folded into the next matmul's); `eps` is dim * eps."""
        return x * torch.linalg.vecdot(x, x).unsqueeze(-1).add(eps).rsqrt()

    def __call__(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Logits (batch, vocab_size) of the last position of `tokens` (batch, seq) placed at `start_pos`."""
        batch, seq = tokens.shape
        if start_pos + seq > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, decoding reached {start_pos + seq}")
        attend = self._attend_one if seq == 1 else self._attend
        x = F.embedding(tokens.reshape(-1), self.embed)  # (batch * seq, dim)
        for attn_eps, qkv_w, o_w, ffn_eps, gate_up_w, down_w, keys, values in self.layers:
            qkv = self._normalize(x, attn_eps) @ qkv_w
            x = torch.addmm(x, attend(qkv, keys, values, batch, start_pos), o_w)
            gate_up = self._normalize(x, ffn_eps) @ gate_up_w
            x = torch.addmm(x, F.silu(gate_up[:, : self.ffn_dim]).mul_(gate_up[:, self.ffn_dim :]), down_w)
        if seq > 1:
            x = x.view(batch, seq, -1)[:, -1]
        return self._normalize(x, self.norm_eps) @ self.head

    def _attend(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: int, start_pos: int):
        """Attention output (batch * seq, heads * head_dim) of several new positions per row; caches them."""
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = qkv.view(batch, -1, heads + 2 * kv_heads, head_dim)
        end = start_pos + qkv.shape[1]
        qk = torch.view_as_complex(qkv[:, :, : heads + kv_heads].unflatten(-1, (self.half, 2)))
        qk = torch.view_as_real(qk * self.rotation[start_pos:end, None]).flatten(-2)
        keys[:, :, start_pos:end] = qk[:, :, heads:].transpose(1, 2)
        values[:, :, start_pos:end] = qkv[:, :, heads + kv_heads :].transpose(1, 2)
        out = causal_attention(qk[:, :, :heads].transpose(1, 2), keys[:, :, :end], values[:, :, :end])
        return out.transpose(1, 2).reshape(-1, heads * head_dim)

    def _attend_one(self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: int, pos: int):
        """`_attend` for one new position per row, in fewer ops: the token sees every cached position, so
        no mask, and its query heads attend as the rows of their KV head (GQA as a plain SDPA call)."""
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        rotated = (heads + kv_heads) * head_dim
        qk = torch.view_as_complex(qkv[:, :rotated].view(batch, heads + kv_heads, self.half, 2))
        qk = torch.view_as_real(qk * self.rotation[pos])  # (batch, heads + kv_heads, half, 2)
        keys[:, :, pos] = qk[:, heads:].view(batch, kv_heads, head_dim)
        values[:, :, pos] = qkv[:, rotated:].view(batch, kv_heads, head_dim)
        q = qk[:, :heads].view(batch, kv_heads, heads // kv_heads, head_dim)
        out = F.scaled_dot_product_attention(q, keys[:, :, : pos + 1], values[:, :, : pos + 1])
        return out.view(batch, heads * head_dim)


def _fold(norm_weight: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in) transposed, with the RMSNorm weight g before it folded in, times sqrt(in) (see
    `DenseForward._normalize`): (x * g) @ W.T == x @ (g * W).T."""
    return (weight * (norm_weight * weight.shape[1] ** 0.5)).t().contiguous()


def forward_step(model: nn.Module, batch: int, max_len: int, vocab_size: int) -> ModelForward | DenseForward:
    """The fastest step that computes `model`'s forward for a decode of `batch` rows up to `max_len` positions."""
    kind = DenseForward if DenseForward.supports(model) else ModelForward
    return kind(model, batch, max_len, vocab_size)
