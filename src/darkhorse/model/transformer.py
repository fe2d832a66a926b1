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
from darkhorse.model.attention import RowCache, build_attention, row_positions
from darkhorse.model.kernels import IGNORE_INDEX, linear_cross_entropy
from darkhorse.model.layers import RMSNorm, Smear, dense_ffn, rope_tables
from darkhorse.model.mhc import HyperConnection, expand_streams, merge_streams
from darkhorse.model.moe import GroupDecision, MoE
from darkhorse.model.mtp import MTPModule

__all__ = ["IGNORE_INDEX", "SIDE_HEADS", "ModelOutput", "Transformer"]

# Side heads: trained on detached hidden states (the group context's evidence). They start at zero, adding
# nothing until they learn, draw no init randomness and are clipped apart from the model (the trainer), so
# switching one on leaves the rest of the model's training exactly as it was.
SIDE_HEADS = ("group_context.weight",)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # None from a forward with `return_logits=False`
    loss: torch.Tensor | None = None
    # Named loss terms that make up `loss` (e.g. "lm", "mtp"), detached, for logging.
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


def build_ffn(config: ModelConfig, layer_idx: int) -> nn.Module:
    """Dense SwiGLU, or MoE from layer `moe.first_k_dense` on (DeepSeek's first_k_dense_replace)."""
    if config.ffn == "moe" and layer_idx >= config.moe.first_k_dense:
        return MoE(config, layer_idx)
    return dense_ffn(config)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)).

    With `residual: mhc`, x is (batch, seq, n, D) streams and hyper-connections replace the adds.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = build_attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = build_ffn(config, layer_idx)
        # only a MoE with domain routing routes by the tokens' domains; every other FFN sees hidden states only
        self.ffn_takes_domains = isinstance(self.ffn, MoE) and config.moe.domain_routing != "none"
        if config.residual == "mhc":
            self.attn_hc = HyperConnection(config)
            self.ffn_hc = HyperConnection(config)

    def _ffn(self, h: torch.Tensor, domains: torch.Tensor | None, cache, start_pos, decision) -> torch.Tensor:
        h = self.ffn_norm(h)
        if not self.ffn_takes_domains:
            return self.ffn(h)
        return self.ffn(h, domains, cache=cache, start_pos=start_pos, decision=decision)

    def forward(
        self,
        x,
        rope,
        cache=None,
        start_pos: int | torch.Tensor = 0,
        domains=None,
        value_embed=None,
        kv_input=None,
        attn_input=None,
        group_decision: GroupDecision | None = None,
    ) -> torch.Tensor:
        """`cache`: the attention's, or a `LayerCache` where the FFN keeps decode state too; `value_embed`:
        this layer's value embeddings of the tokens (model.value_embeds), which only GQA takes; `kv_input`:
        what the keys and values are computed from where it is not `x` (layer 0 with model.smear=kv);
        `attn_input`: what the whole attention, queries too, reads where not `x` (layer 0, model.smear=attn);
        `group_decision`: the forward's expert-group ranking, shared by its domain-isolated MoE layers."""
        attn_cache, ffn_cache = (cache.attn, cache.ffn) if isinstance(cache, LayerCache) else (cache, None)
        values = {} if value_embed is None else {"value_embed": value_embed}
        if kv_input is not None:
            values["kv_input"] = self.attn_norm(kv_input)
        if hasattr(self, "attn_hc"):
            x = self.attn_hc(x, lambda h: self.attn(self.attn_norm(h), rope, attn_cache, start_pos, **values))
            return self.ffn_hc(x, lambda h: self._ffn(h, domains, ffn_cache, start_pos, group_decision))
        x = x + self.attn(
            self.attn_norm(x if attn_input is None else attn_input), rope, attn_cache, start_pos, **values
        )
        return x + self._ffn(x, domains, ffn_cache, start_pos, group_decision)


class LayerCache:
    """A block's decode state where its MoE keeps some too (group routing's running sums): both
    caches' rows are viewed and moved together."""

    def __init__(self, attn, ffn) -> None:
        self.attn, self.ffn = attn, ffn

    def rows(self, start: int, stop: int) -> LayerCache:
        return LayerCache(self.attn.rows(start, stop), self.ffn.rows(start, stop))

    def move_row(self, source: int, target: int) -> None:
        self.attn.move_row(source, target)
        self.ffn.move_row(source, target)

    @property
    def nbytes(self) -> int:
        return self.attn.nbytes + self.ffn.nbytes


class TokenCache(RowCache):
    """The token id at each position, (batch, 1, max_len, 1): what `model.smear` looks 1 .. `model.smear_width`
    positions back at while decoding. Kept by position, not as "the last token", so a decode that rewinds (a
    rejected MTP draft) or rows at different positions read the right one."""

    FIELDS = ("tokens",)

    def __init__(self, batch: int, max_len: int, device) -> None:
        self.tokens = torch.zeros(batch, 1, max_len, 1, dtype=torch.long, device=device)


class Transformer(nn.Module):
    kernels = "torch"  # the output head's loss: torch (chunked) or liger (model/kernels.py)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.dim)
        if config.positions == "learned":
            self.pos_embed = nn.Embedding(config.max_seq_len, config.dim)
        if config.smear != "none":
            self.smear = Smear(config.dim, config.smear_scale, config.smear_width)
        kv_width = config.n_kv_heads * config.head_dim
        self.value_embeds = nn.ModuleList(
            nn.Embedding(config.padded_vocab_size, kv_width) for _ in range(config.value_embeds)
        )
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Training-only multi-token-prediction modules (layer ids continue after the main stack).
        self.mtp = nn.ModuleList(MTPModule(config, Block(config, config.n_layers + k)) for k in range(config.mtp_depth))
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
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 * layers), or
        zero with `model.zero_init_out` (each block starts as the identity; its input grads still flow)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            if name.endswith(SIDE_HEADS):
                nn.init.zeros_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                if self.config.zero_init_out:
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(param, mean=0.0, std=std)
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
        start_pos: int | torch.Tensor = 0,
        domains: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final normed hidden states; `start_pos`: one int for the batch, or each row's own (a tensor)."""
        seq = tokens.shape[1]
        per_row = isinstance(start_pos, torch.Tensor)
        end = int(start_pos.max()) + seq if per_row else start_pos + seq
        if end > self.config.max_seq_len:
            raise ValueError(f"sequence reaches position {end} > max_seq_len {self.config.max_seq_len}")
        positions = row_positions(start_pos, seq) if per_row else torch.arange(start_pos, end, device=tokens.device)
        x, smeared = self.embed(tokens), None  # smeared: what layer 0's attention reads besides x (kv, attn)
        if hasattr(self, "smear"):
            smeared = self.smear(x, self._previous_embeddings(tokens, x, cache, start_pos, positions))
            x, smeared = (smeared, None) if self.config.smear == "embed" else (x, smeared)
        if hasattr(self, "pos_embed"):
            x, rope = x + self.pos_embed(positions), None
            smeared = None if smeared is None else smeared + self.pos_embed(positions)
        elif per_row:
            rope = (self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1))
        else:
            rope = (self.rope_cos[start_pos:end], self.rope_sin[start_pos:end])
        if self.config.residual == "mhc":
            x = expand_streams(x, self.config.mhc.expansion)
        first = (smeared, None) if self.config.smear == "kv" else (None, smeared)  # layer 0's kv_input, attn_input
        decision = GroupDecision()  # the first isolated MoE layer's group ranking, for the later ones
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            value_embed = self.value_embeds[i](tokens) if i < len(self.value_embeds) else None
            layer_args = (x, rope, layer_cache, start_pos, domains, value_embed, *(first if i == 0 else (None, None)))
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, *layer_args, use_reentrant=False, group_decision=decision)
            else:
                x = layer(*layer_args, group_decision=decision)
        if self.config.residual == "mhc":
            x = merge_streams(x)
        return self.norm(x)

    def _previous_embeddings(self, tokens, x, cache, start_pos, positions) -> torch.Tensor:
        """The embeddings 1 .. `model.smear_width` positions back of each token, (batch, seq, width, dim) (zeros
        before position 0); while decoding, the earlier tokens come from the cache's `TokenCache` (its last
        entry), which this records `tokens` in. Without a cache a chunk's first tokens have none (as at 0)."""
        width, seq = self.config.smear_width, tokens.shape[1]
        if cache is None:
            return torch.stack([F.pad(x, (0, 0, back, 0))[:, :seq] for back in range(1, width + 1)], 2)
        stored = cache[len(self.layers)]._write("tokens", tokens[:, None, :, None], start_pos)[:, 0, :, 0]
        rows = positions if positions.dim() == 2 else positions.expand(len(tokens), -1)
        back = rows.unsqueeze(-1) - torch.arange(1, width + 1, device=rows.device)
        previous = self.embed(stored.gather(1, back.clamp(min=0).flatten(1))).view(*back.shape, -1)
        return previous * (back >= 0).unsqueeze(-1).to(previous.dtype)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: list | None = None,
        start_pos: int | torch.Tensor = 0,
        domains: torch.Tensor | None = None,
        mtp_weight: float = 0.0,
        return_logits: bool = True,
    ) -> ModelOutput:
        """Logits, and with `targets` the loss to backprop: next-token loss plus block losses.

        `mtp_weight` (train.mtp_weight) scales the multi-token-prediction loss of models that have
        MTP modules; `domains` (per-token domain ids) reach the MoE layers that route by domain
        (and forward hooks, e.g. the trainer's routing statistics, can read them from the call).
        MTP runs only when `targets` are given, so generation never pays for it. With targets and
        `return_logits=False` (the trainer's call) every head's loss is the fused linear +
        cross-entropy, which never holds the whole [tokens, vocab] logits, and `logits` is None.
        """
        hidden = self.hidden_states(tokens, cache, start_pos, domains)
        fused = targets is not None and not return_logits
        logits = None if fused else self.logits(hidden)
        if targets is None:
            return ModelOutput(logits=logits)
        lm_loss = self._head_loss(hidden, targets) if fused else self._cross_entropy(logits, targets)
        loss, losses = lm_loss, {"lm": lm_loss.detach()}
        if self.mtp:
            mtp_loss = self._mtp_loss(hidden, tokens, targets, domains, fused)
            loss = loss + mtp_weight * mtp_loss
            losses["mtp"] = mtp_loss.detach()
        # the blocks' FFNs, not self.modules(): walking modules that the forward mutated breaks torch.compile's graph
        for block in (*self.layers, *(module.block for module in self.mtp)):
            if isinstance(block.ffn, MoE):
                for name, term in block.ffn.take_losses().items():
                    loss = loss + term
                    losses[name] = losses.get(name, 0) + term.detach()
        return ModelOutput(logits=logits, loss=loss, losses=losses)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head, soft-capped to (-cap, cap) with `model.logit_softcap`."""
        logits = self.lm_head(hidden)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    @staticmethod
    def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over the targets that count; 0, not NaN, when a loss mask leaves none in the batch."""
        flat = targets.reshape(-1)
        total = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), flat, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return total / flat.ne(IGNORE_INDEX).sum().clamp(min=1)

    def _head_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`_cross_entropy(self.logits(hidden), targets)` computed without the whole logits."""
        total = linear_cross_entropy(hidden, self.lm_head.weight, targets, self.config.logit_softcap, self.kernels)
        return total / targets.ne(IGNORE_INDEX).sum().clamp(min=1)

    def _mtp_loss(self, hidden, tokens, targets, domains, fused: bool = False) -> torch.Tensor:
        """Mean over depths k of the loss on token i+k+1, predicted from position i."""
        losses = []
        seq = tokens.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            if seq - k < 1:
                break
            rope = None if hasattr(self, "pos_embed") else (self.rope_cos[: seq - k], self.rope_sin[: seq - k])
            depth_domains = domains[:, k:] if domains is not None else None
            hidden = module(hidden[:, : seq - k], self.embed(tokens[:, k:]), rope, depth_domains)
            depth_targets = targets[:, k:]
            if fused:
                losses.append(self._head_loss(hidden, depth_targets))
            else:
                losses.append(self._cross_entropy(self.logits(hidden), depth_targets))
        return torch.stack(losses).mean() if losses else hidden.new_zeros(())

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> list:
        """Per layer, the attention's cache; a `LayerCache` where a MoE routes by running sums over the text
        (the domain posterior, the group context). With `model.smear`, one more entry after the layers': the
        tokens so far (`TokenCache`)."""
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        caches = []
        for layer in self.layers:
            cache = layer.attn.new_cache(batch, max_len, device, dtype)
            if isinstance(layer.ffn, MoE) and layer.ffn_takes_domains and layer.ffn.keeps_decode_state():
                cache = LayerCache(cache, layer.ffn.new_cache(batch, max_len, device))
            caches.append(cache)
        if hasattr(self, "smear"):
            caches.append(TokenCache(batch, max_len, device))
        return caches

    # -- hooks the trainer calls ----------------------------------------------------------------

    def after_optimizer_step(self, step: int) -> None:
        """Updates outside autograd (e.g. MoE balance bias) that blocks run after each step."""
        for module in self.modules():
            if module is not self and hasattr(module, "after_optimizer_step"):
                module.after_optimizer_step(step)

    def training_metrics(self) -> dict[str, float]:
        """Scalars that blocks report for the dashboard and metrics.jsonl (e.g. expert load): each
        module's own, plus what a module class sums up over all its layers (`summary_metrics`)."""
        metrics: dict[str, float] = {}
        by_kind: dict[type, list[nn.Module]] = {}
        for module in self.modules():
            if module is not self and hasattr(module, "training_metrics"):
                metrics.update(module.training_metrics())
                by_kind.setdefault(type(module), []).append(module)
        for kind, modules in by_kind.items():
            if hasattr(kind, "summary_metrics"):
                metrics.update(kind.summary_metrics(modules))
        return metrics

    # -- accounting -----------------------------------------------------------------------------

    def num_params(self) -> int:
        """Unique parameters (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self, include_mtp: bool = False) -> int:
        """Parameters one token touches: all, minus experts a MoE layer leaves idle, minus the MTP
        modules unless `include_mtp` (they run in training only)."""

        def active(module: nn.Module) -> int:
            idle = sum(m.idle_params_per_token() for m in module.modules() if hasattr(m, "idle_params_per_token"))
            return sum(p.numel() for p in module.parameters()) - idle

        return active(self) - (0 if include_mtp else active(self.mtp))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (active matmul params) + attention scores (PaLM appendix B).

        Counts the MTP modules too, and the output head once per prediction depth."""
        head_uses = int(self.config.tie_embeddings) + len(self.mtp)
        tables = [self.embed, getattr(self, "pos_embed", None), *self.value_embeds]
        lookups = [m.weight.numel() for m in tables if m is not None]
        matmul_params = self.num_active_params(include_mtp=True) - sum(lookups)
        matmul_params += head_uses * self.lm_head.weight.numel()
        attention = 0
        for layer in [*self.layers, *(module.block for module in self.mtp)]:
            qk_dim, v_dim = layer.attn.score_dims
            attention += 6 * layer.attn.n_heads * seq_len * (qk_dim + v_dim)
        return 6 * matmul_params + attention

    def kv_cache_values_per_token(self) -> int:
        """Cached values per token across all layers (multiply by bytes per value)."""
        return sum(layer.attn.cache_values_per_token() for layer in self.layers)
