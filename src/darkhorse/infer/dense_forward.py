"""The decode engine's forward step for plain dense GQA models: the same computation as `Transformer.forward`
with a KV cache, restated with fewer, larger tensor ops.

At decoding sizes (a few rows, one new token each) a step is dozens of small kernels, and the per-op
dispatch and the module calls cost as much as the arithmetic. So, for one decode (an `Engine.steps` call,
or a server's continuous batch):

- each layer's q/k/v projections are one matmul and gate/up another, against weights concatenated and
  stored transposed once per call (x @ W runs faster than `F.linear` at these shapes), with the RMSNorm
  weight before them folded in, and sqrt(dim) too: RMSNorm's x / sqrt(mean(x^2) + eps) is then
  x / sqrt(x.x + dim * eps), a dot product (`vecdot`, one kernel) instead of square, mean and add; the
  residual adds ride in `addmm`;
- QK-norm (`model.qk_norm`, tiny-cpu's default) normalizes each q and k head in place before RoPE, its
  weights permuted like q and k's channels;
- RoPE turns q and k in one complex product (each half-split pair of channels stored side by side);
- keys and values go into preallocated caches, in place, at one position shared by the batch or at each
  row's own (`start_pos` a tensor: continuous batching, where rows also move between cache rows);
- one new token attends with its query heads as rows of its KV head (GQA as a plain SDPA call), with no
  mask when the rows share a position, else under one additive mask built once for all layers;
- the output head runs on the last position only, over the tokenizer's ids only.

Every formula is the model's; only the order of float operations differs (grouped and folded matmuls, the
RoPE channel order inside q.k), so logits agree with `Transformer.forward`'s to float rounding
(tests/infer/test_dense_forward.py; tests/infer/test_engine.py holds the greedy tokens equal to a cache-free
recompute). Training never comes here: it runs `Transformer.forward`, unchanged. Other models (MLA, MoE,
mHC, attention biases, value embeddings, the embedding smear, non-fp32 weights, LoRA layers, hooks, anything
that is not a plain `Transformer`) decode through their own forward (`ModelForward`).

Measured (bench/bench_eval.py, docs/benchmarks.md "Eval throughput"): a left-padded one-call prefill of
ragged prompts with a per-row pad mask was slower than feeding the longer prompts' tails token by token
(the masked SDPA costs more per step than the ~3% of steps it saves), so the shared position keeps its
unmasked step; attention as two matmuls was no faster than SDPA.

A step, whichever class: `step(tokens (batch, seq), start_pos)` -> the last position's logits (batch,
vocab_size), `start_pos` one int or a (batch,) tensor; that is all `Engine.steps` calls. A continuous batch
also passes `row=` (the tokens go to cache rows `row`..: a joining request is prefilled in its own row) and
`all_positions=True` (every position's logits, for prompt logprobs), and calls `move_row(source, target)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from darkhorse.infer.native_step import NativeStep
from darkhorse.model import Transformer
from darkhorse.model.attention import GroupedQueryAttention, causal_attention, row_positions
from darkhorse.model.layers import RMSNorm, SwiGLU
from darkhorse.model.transformer import Block


class ModelForward:
    """Any model's step: `Transformer.forward` with the model's own caches."""

    argmax: int | None = None  # no greedy id of its own (`NativeStep.argmax` has one)

    def __init__(self, model: nn.Module, batch: int, max_len: int, vocab_size: int) -> None:
        self.model = model
        self.batch = batch
        self.cache = model.new_cache(batch, max_len)
        self.vocab_size = vocab_size

    def __call__(
        self, tokens: torch.Tensor, start_pos: int | torch.Tensor, *, row: int = 0, all_positions: bool = False
    ) -> torch.Tensor:
        """Logits (batch, vocab_size) of the last position of `tokens` (batch, seq) placed at `start_pos` (one
        int, or each row's own: a (batch,) tensor) in cache rows `row`.. (all positions' with `all_positions`)."""
        cache = self.cache
        if row or len(tokens) != self.batch:
            cache = [layer_cache.rows(row, row + len(tokens)) for layer_cache in cache]
        logits = self.model(tokens, cache=cache, start_pos=start_pos).logits
        return logits[..., : self.vocab_size] if all_positions else logits[:, -1, : self.vocab_size]

    def move_row(self, source: int, target: int) -> None:
        """Copy cache row `source` over row `target` (a continuous batch keeps its live rows first)."""
        for layer_cache in self.cache:
            layer_cache.move_row(source, target)


class DenseForward:
    """The dense GQA step (see the module docstring); build one per decode, as weights may change."""

    argmax: int | None = None  # no greedy id of its own (`NativeStep.argmax` has one)

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
            or (config.ffn_activation, config.positions, config.logit_softcap) != ("swiglu", "rope", 0.0)
            or config.value_embeds
            or config.smear != "none"
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
            if config.qk_norm:
                kinds += [(attn.q_norm, RMSNorm), (attn.k_norm, RMSNorm)]
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
        self.qk_norms: list[tuple[torch.Tensor, float] | None] = []  # per layer: QK-norm weights and eps
        self.caches = []  # each layer's (keys, values), zeroed: a masked-out position is still multiplied by 0
        device, dtype = self.embed.device, self.embed.dtype
        for block in model.layers:
            attn, ffn = block.attn, block.ffn
            q_w = attn.q_proj.weight.view(self.n_heads, self.head_dim, -1)[:, pairs].flatten(0, 1)
            k_w = attn.k_proj.weight.view(self.n_kv_heads, self.head_dim, -1)[:, pairs].flatten(0, 1)
            qkv = torch.cat([q_w, k_w, attn.v_proj.weight])
            gate_up = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight])
            self.qk_norms.append(self._qk_norm(attn, pairs))
            self.layers.append(
                (
                    self._eps(block.attn_norm.eps),
                    _fold(block.attn_norm.weight, qkv),
                    attn.o_proj.weight.t().contiguous(),
                    self._eps(block.ffn_norm.eps),
                    _fold(block.ffn_norm.weight, gate_up),
                    ffn.down_proj.weight.t().contiguous(),
                )
            )
            shape = (batch, self.n_kv_heads, max_len, self.head_dim)
            self.caches.append(
                (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            )
        self.norm_eps = self._eps(model.norm.eps)
        self.head = _fold(model.norm.weight, model.lm_head.weight[:vocab_size])
        self.batch, self.max_len = batch, max_len
        self.row_ids = torch.arange(batch, device=device)  # for per-row cache writes
        self.cache_positions = torch.arange(max_len, device=device)  # for per-row attention masks

    def _qk_norm(self, attn: GroupedQueryAttention, pairs: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """A layer's QK-norm as one (heads + kv_heads, head_dim) weight in the permuted channel order of q and k
        (the norm's weight sits between it and RoPE, so it cannot fold into the matmul), or None."""
        if not hasattr(attn, "q_norm"):
            return None
        q = attn.q_norm.weight[pairs].expand(self.n_heads, -1)
        k = attn.k_norm.weight[pairs].expand(self.n_kv_heads, -1)
        return torch.cat([q, k]).contiguous(), attn.q_norm.eps

    def _eps(self, eps: float) -> torch.Tensor:
        """A norm's eps times dim, as a tensor (adding a Python float costs a scalar wrap per call)."""
        return torch.tensor(eps * self.embed.shape[1], device=self.embed.device, dtype=self.embed.dtype)

    @staticmethod
    def _normalize(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """RMSNorm times 1/sqrt(dim), before its weight (both folded into the next matmul's); `eps` is dim * eps."""
        return x * torch.linalg.vecdot(x, x).unsqueeze(-1).add(eps).rsqrt()

    def __call__(
        self, tokens: torch.Tensor, start_pos: int | torch.Tensor, *, row: int = 0, all_positions: bool = False
    ) -> torch.Tensor:
        """Logits (batch, vocab_size) of the last position of `tokens` (batch, seq) placed at `start_pos`, in
        cache rows `row`..; all positions' logits (batch, seq, vocab_size) with `all_positions`.

        `start_pos` is one int for every row (no attention mask for one new token), or each row's own, a
        (batch,) tensor (continuous batching): each row then attends to its own positions, under a mask."""
        batch, seq = tokens.shape
        per_row = isinstance(start_pos, torch.Tensor)
        end = int(start_pos.max()) + seq if per_row else start_pos + seq
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, decoding reached {end}")
        caches = self.caches
        if row or batch != self.batch:
            caches = [(keys[row : row + batch], values[row : row + batch]) for keys, values in caches]
        # where the new tokens go, their RoPE turns and, per row, the attention mask: once for all layers
        if per_row:
            at = row_positions(start_pos, seq)  # (batch, seq)
            rotation = self.rotation[at].unsqueeze(2)
            seen = self.cache_positions[:end] <= at[..., None]
            # additive: SDPA turns a bool mask into this in every call
            mask = torch.zeros(seen.shape, dtype=self.embed.dtype, device=self.embed.device)
            mask = mask.masked_fill_(~seen, float("-inf")).unsqueeze(1)  # (batch, 1, seq, end)
        else:
            at, rotation, mask = start_pos, self.rotation[start_pos:end, None], None
        attend = self._attend_one if seq == 1 else self._attend
        x = F.embedding(tokens.reshape(-1), self.embed)  # (batch * seq, dim)
        layers = zip(self.layers, caches, self.qk_norms, strict=True)
        for (attn_eps, qkv_w, o_w, ffn_eps, gate_up_w, down_w), (keys, values), qk_norm in layers:
            qkv = self._normalize(x, attn_eps) @ qkv_w
            if qk_norm is not None:  # RMSNorm over each q and k head, in place, before RoPE
                weight, eps = qk_norm
                qk = qkv[:, : weight.numel()].unflatten(-1, weight.shape)
                qk.copy_(F.rms_norm(qk, (self.head_dim,), eps=eps).mul_(weight))
            x = torch.addmm(x, attend(qkv, keys, values, at, end, rotation, mask), o_w)
            gate_up = self._normalize(x, ffn_eps) @ gate_up_w
            x = torch.addmm(x, F.silu(gate_up[:, : self.ffn_dim]).mul_(gate_up[:, self.ffn_dim :]), down_w)
        if all_positions:
            return (self._normalize(x, self.norm_eps) @ self.head).view(batch, seq, -1)
        if seq > 1:
            x = x.view(batch, seq, -1)[:, -1]
        return self._normalize(x, self.norm_eps) @ self.head

    def move_row(self, source: int, target: int) -> None:
        """Copy cache row `source` over row `target` (a continuous batch keeps its live rows first)."""
        for keys, values in self.caches:
            keys[target] = keys[source]
            values[target] = values[source]

    def _attend(self, qkv, keys, values, at, end: int, rotation, mask) -> torch.Tensor:
        """Attention output (batch * seq, heads * head_dim) of several new positions per row; caches them.
        `at`: the first position (an int), or each new token's own (batch, seq) under `mask`."""
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        batch = keys.shape[0]
        qkv = qkv.view(batch, -1, heads + 2 * kv_heads, head_dim)
        qk = torch.view_as_complex(qkv[:, :, : heads + kv_heads].unflatten(-1, (self.half, 2)))
        qk = torch.view_as_real(qk * rotation).flatten(-2)
        new_keys, new_values = qk[:, :, heads:], qkv[:, :, heads + kv_heads :]  # (batch, seq, kv_heads, head_dim)
        q = qk[:, :, :heads].transpose(1, 2)
        if mask is None:
            keys[:, :, at:end] = new_keys.transpose(1, 2)
            values[:, :, at:end] = new_values.transpose(1, 2)
            out = causal_attention(q, keys[:, :, :end], values[:, :, :end])
        else:
            keys[self.row_ids[:batch, None], :, at] = new_keys
            values[self.row_ids[:batch, None], :, at] = new_values
            out = F.scaled_dot_product_attention(
                q, keys[:, :, :end], values[:, :, :end], attn_mask=mask, enable_gqa=heads != kv_heads
            )
        return out.transpose(1, 2).reshape(-1, heads * head_dim)

    def _attend_one(self, qkv, keys, values, at, end: int, rotation, mask) -> torch.Tensor:
        """`_attend` for one new position per row, in fewer ops: its query heads attend as the rows of their
        KV head (GQA as a plain SDPA call), unmasked when every row is at `at` (it sees every cached
        position), else under `mask`, each row's own positions."""
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        batch = keys.shape[0]
        rotated = (heads + kv_heads) * head_dim
        qk = torch.view_as_complex(qkv[:, :rotated].view(batch, heads + kv_heads, self.half, 2))
        qk = torch.view_as_real(qk * rotation[:, 0])  # (batch, heads + kv_heads, half, 2)
        new_keys, new_values = (
            qk[:, heads:].view(batch, kv_heads, head_dim),
            qkv[:, rotated:].view(batch, kv_heads, head_dim),
        )
        if mask is None:
            keys[:, :, at] = new_keys
            values[:, :, at] = new_values
        else:
            keys[self.row_ids[:batch], :, at[:, 0]] = new_keys
            values[self.row_ids[:batch], :, at[:, 0]] = new_values
        q = qk[:, :heads].view(batch, kv_heads, heads // kv_heads, head_dim)
        out = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask)
        return out.view(batch, heads * head_dim)


def _fold(norm_weight: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out, in) transposed, with the RMSNorm weight g before it folded in, times sqrt(in) (see
    `DenseForward._normalize`): (x * g) @ W.T == x @ (g * W).T."""
    return (weight * (norm_weight * weight.shape[1] ** 0.5)).t().contiguous()


def forward_step(
    model: nn.Module, batch: int, max_len: int, vocab_size: int, *, per_row: bool = False
) -> ModelForward | DenseForward | NativeStep:
    """The fastest step that computes `model`'s forward for a decode of `batch` cache rows up to `max_len`
    positions, returning logits over the head's first `vocab_size` rows (see the module docstring). A single
    row of a dense model decodes in native code where it builds (infer/native_step.py), unless the caller
    needs a continuous batch's calls (`per_row`: per-row positions, row prefills, row moves)."""
    kind = DenseForward if DenseForward.supports(model) else ModelForward
    if kind is DenseForward and not per_row and NativeStep.supports(model, batch):
        kind = NativeStep
    return kind(model, batch, max_len, vocab_size)
