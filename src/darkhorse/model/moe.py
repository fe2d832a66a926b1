"""DeepSeek-style Mixture-of-Experts FFN: routed experts + shared experts, balanced without an aux loss.

Tensors of one MoE layer (`layers.{i}.ffn.` prefix) and what the exporters map them to:

    gate.weight [E, D]                    router     HF mlp.gate.weight          GGUF ffn_gate_inp
    gate.e_score_correction_bias [E]      ALF bias (fp32 buffer, no grad)        GGUF exp_probs_b.bias
    experts.gate_proj [E, I, D]           HF mlp.experts.{j}.gate_proj.weight = gate_proj[j]   GGUF ffn_gate_exps
    experts.up_proj   [E, I, D]           HF mlp.experts.{j}.up_proj.weight   = up_proj[j]     GGUF ffn_up_exps
    experts.down_proj [E, D, I]           HF mlp.experts.{j}.down_proj.weight = down_proj[j]   GGUF ffn_down_exps
    shared_experts.{gate,up,down}_proj.weight   SwiGLU of width n_shared * I                GGUF ffn_*_shexp
    domain_prior_scale []                 only with moe.domain_prior (annealing state; exporters drop it)
    group_context.weight [G, D]           only with moe.group_context, in the layers that rank groups
                                          (`group_decision_role`; darkhorse inference; exporters drop it)

(Mixtral: `block_sparse_moe.gate.weight`, `experts.{j}.w1/w3/w2` = gate/up/down_proj[j], no shared experts.)

Routing: selection uses score + bias (+ the annealed domain prior while training); combine weights
use the plain scores (sigmoid: optionally normalised over the top-k; softmax: softmax over all
experts, renormalised over the top-k), times `routed_scaling_factor`. Dispatch sorts token slots by
expert and runs each projection as one grouped matmul (`torch._grouped_mm`), so there is no
Python loop over experts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from darkhorse.config import ModelConfig, MoEConfig
from darkhorse.errors import ConfigError
from darkhorse.model.attention import RowCache
from darkhorse.model.layers import SwiGLU, silu_mul

log = logging.getLogger("darkhorse")


@dataclass
class GroupDecision:
    """One forward's expert-group ranking [T, n_groups]: made by the first domain-isolated MoE layer, read by
    the later ones (model.moe.group_context)."""

    ranking: torch.Tensor | None = None


# the group_decision_role()s that rank groups themselves, so carry a group context head
RANKING_ROLES = ("lead", "own")


def group_decision_role(config: ModelConfig, layer_idx: int) -> str:
    """Who ranks a token's expert groups with model.moe.group_context: "lead", the main stack's first
    domain-isolated MoE layer, by its own group scores plus its context head; "follow", the later isolated
    layers, route in the groups it chose (one decision a token, as DEMix keeps one domain posterior a
    document: on kinds3 a later layer's own head lost it up to 2.7 points of H(domain), and following cost
    nothing, docs/experiments.md); "own", an MTP block's MoE, which reads other positions, by its own head;
    "" without a context (layers that route freely, or no group_context)."""
    moe = config.moe
    if not (moe.group_context and moe.domain_routing == "isolated") or layer_idx < moe.isolated_from_layer:
        return ""
    if layer_idx >= config.n_layers:
        return "own"
    return "lead" if layer_idx == max(moe.first_k_dense, moe.isolated_from_layer) else "follow"


@dataclass
class Routing:
    """One forward's routing decision for T tokens."""

    logits: torch.Tensor  # [T, E] router logits (fp32)
    scores: torch.Tensor  # [T, E] sigmoid or softmax of the logits
    experts: torch.Tensor  # [T, K] chosen expert ids
    weights: torch.Tensor  # [T, K] combine weights


class Router(nn.Module):
    """Scores every expert per token and picks the top-k; the ALF bias shifts selection only."""

    def __init__(self, dim: int, moe: MoEConfig, init_std: float = 0.02) -> None:
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.randn(moe.n_routed_experts, dim) * init_std)
        self.register_buffer("e_score_correction_bias", torch.zeros(moe.n_routed_experts, dtype=torch.float32))

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32 logits (a LoRA router adds its low-rank term here)."""
        return F.linear(x.float(), self.weight.float())

    def scores_of(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, E] expert affinities: sigmoid (DeepSeek-V3) or softmax scoring of the logits."""
        return logits.sigmoid() if self.moe.scoring == "sigmoid" else logits.softmax(dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        selection_bonus: torch.Tensor | None = None,
        rank_groups: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Routing:
        """`rank_groups` maps the tokens' [T, n_groups] group scores to what ranks the groups instead
        (the document's group posterior)."""
        moe = self.moe
        logits = self.router_logits(x)
        scores = self.scores_of(logits)
        selection = scores.detach() + self.e_score_correction_bias.float()
        if selection_bonus is not None:
            selection = selection + selection_bonus
        if moe.n_groups > 1:
            ranking = group_scores(selection, moe.n_groups)
            if rank_groups is not None:
                ranking = rank_groups(ranking)
            selection = _limit_to_top_groups(selection, ranking, moe.topk_groups)
        experts = selection.topk(moe.experts_per_token, dim=-1).indices
        weights = scores.gather(1, experts)
        if moe.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(logits, scores, experts, weights * moe.routed_scaling_factor)


def group_scores(scores: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[T, E] -> [T, n_groups]: each group's score, the sum of its best two experts' (DeepSeek-V3)."""
    grouped = scores.view(scores.shape[0], n_groups, -1)
    return grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)


def _limit_to_top_groups(selection: torch.Tensor, ranking: torch.Tensor, topk_groups: int) -> torch.Tensor:
    """DeepSeek-V3 group-limited routing: keep the experts of the `topk_groups` best-ranked groups
    (`ranking` [T, n_groups]: the top-2 sums of `selection`, or the document's posterior)."""
    keep = torch.zeros_like(ranking, dtype=torch.bool)
    keep.scatter_(1, ranking.topk(topk_groups, dim=-1).indices, True)
    grouped = selection.view(selection.shape[0], ranking.shape[1], -1)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(selection)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    """Whether `torch._grouped_mm` can multiply by [E, out_features, in_features] expert weights.

    It raises unless every row of both operands is 16-byte aligned, on CPU too (the gate/up
    input rows hold `in_features` values, the down projection's hold `out_features`), so both sizes
    must fill whole 16-byte units. On CPU it then runs in any float dtype, except under torch.compile,
    whose shape-inference kernel for it accepts bf16 only; on CUDA its kernels take bf16 only, on
    sm90+. Anything else takes the padded-bmm path.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if (out_features * dtype.itemsize) % 16 or (in_features * dtype.itemsize) % 16:
        return False
    if device.type == "cpu":
        return dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)


def grouped_matmul(
    x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool | None = None
) -> torch.Tensor:
    """Rows of `x` sorted by expert (`counts[e]` rows for expert e) times weight[e].T: [N, in] -> [N, out].

    Without grouped_mm support the rows are scattered into a zero-padded [E, max_count, in] batch
    for one `bmm` (more memory, still no Python loop over experts).
    """
    weight = weight.to(x.dtype)
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_supported(x.device, x.dtype, *weight.shape[-2:])
    if use_grouped_mm:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=counts.cumsum(0).to(torch.int32))
    return padded_grouped_mm(x, weight, counts)


def _by_expert(x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`x`'s rows scattered into a zero-padded [E, max_count, in] batch, and each row's (expert, slot) there."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
    row_in_expert = torch.arange(x.shape[0], device=x.device) - (counts.cumsum(0) - counts)[expert_of_row]
    padded = x.new_zeros(len(counts), int(counts.max()) if x.shape[0] else 0, x.shape[1])
    padded[expert_of_row, row_in_expert] = x
    return padded, (expert_of_row, row_in_expert)


# The padded path's shapes depend on the routing (the busiest expert's count), which torch.compile
# cannot trace without a graph break per layer. As custom ops (with their own backward) they are one
# opaque node of known output shape in the compiled graph, and run eagerly inside.
@torch.library.custom_op("darkhorse::padded_grouped_mm", mutates_args=())
def padded_grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`grouped_matmul` by one zero-padded `bmm`: [N, in] x [E, out, in] -> [N, out]."""
    padded, rows = _by_expert(x, counts)
    return torch.bmm(padded, weight.transpose(-2, -1))[rows]


@padded_grouped_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("darkhorse::padded_grouped_mm_weight_grad", mutates_args=())
def padded_grouped_mm_weight_grad(grad: torch.Tensor, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The weight gradient of `padded_grouped_mm`: per expert, its rows' grad.T @ x -> [E, out, in]."""
    padded_grad, _ = _by_expert(grad, counts)
    padded_x, _ = _by_expert(x, counts)
    return torch.bmm(padded_grad.transpose(-2, -1), padded_x)


@padded_grouped_mm_weight_grad.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return grad.new_empty(len(counts), grad.shape[1], x.shape[1])


def _save_inputs(ctx, inputs: tuple, output: torch.Tensor) -> None:  # noqa: ANN001
    ctx.save_for_backward(*inputs)


def _padded_grouped_mm_backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
    x, weight, counts = ctx.saved_tensors
    grad_x = padded_grouped_mm(grad, weight.transpose(-2, -1), counts) if ctx.needs_input_grad[0] else None
    grad_weight = padded_grouped_mm_weight_grad(grad, x, counts) if ctx.needs_input_grad[1] else None
    return grad_x, grad_weight, None


padded_grouped_mm.register_autograd(_padded_grouped_mm_backward, setup_context=_save_inputs)


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked [E, out, in] weights."""

    kernels = "torch"  # silu(gate) * up's (model/kernels.py)

    def __init__(self, n_experts: int, dim: int, hidden: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.randn(n_experts, hidden, dim) * init_std)
        self.up_proj = nn.Parameter(torch.randn(n_experts, hidden, dim) * init_std)
        self.down_proj = nn.Parameter(torch.randn(n_experts, dim, hidden) * init_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool | None = None) -> torch.Tensor:
        """`x` [N, D]: token slots sorted by expert, `counts[e]` of them for expert e."""
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        gate, up = self.gate_up(x, counts, use_grouped_mm)
        return self.project("down_proj", silu_mul(gate, up, self.kernels), counts, use_grouped_mm)

    def gate_up(
        self, x: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate and up projections, which read the same rows (a LoRA stack shares work between them)."""
        return self.project("gate_proj", x, counts, use_grouped_mm), self.project("up_proj", x, counts, use_grouped_mm)

    def project(
        self, name: str, x: torch.Tensor, counts: torch.Tensor, use_grouped_mm: bool | None = None
    ) -> torch.Tensor:
        """One projection of every expert (a LoRA expert stack adds its low-rank term here)."""
        return grouped_matmul(x, getattr(self, name), counts, use_grouped_mm)


class MoE(nn.Module):
    """Routed + shared experts with ALF balancing and an optional domain prior.

    The layer keeps only what balancing needs (this step's load); routing statistics for reports are
    counted from outside by a forward hook on `gate`, whose output is the `Routing` decision."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        moe = config.moe
        if moe.domain_routing != "none" and moe.n_domains < 1:
            raise ConfigError(
                f"model.moe.domain_routing={moe.domain_routing} needs model.moe.n_domains "
                "(the number of domains in the prepared data)"
            )
        self.moe = moe
        self.layer_idx = layer_idx
        self.dim = config.dim
        self.gate = Router(config.dim, moe, config.init_std)
        self.experts = RoutedExperts(moe.n_routed_experts, config.dim, moe.moe_intermediate_size, config.init_std)
        self.shared_experts = (
            SwiGLU(config.dim, moe.n_shared_experts * moe.moe_intermediate_size) if moe.n_shared_experts else None
        )
        n_experts = moe.n_routed_experts
        # Balancing state, not weights: counted while training, read and reset after each optimizer step.
        self.register_buffer("load_since_step", torch.zeros(n_experts), persistent=False)
        self.register_buffer("dropped_since_step", torch.zeros(()), persistent=False)
        if moe.domain_prior:
            self.register_buffer("domain_prior_mask", domain_expert_mask(moe.n_domains, n_experts), persistent=False)
            self.register_buffer("domain_prior_scale", torch.ones(()))
        if moe.domain_routing == "isolated":
            owner = expert_domains(moe)
            self.register_buffer("expert_domain", owner, persistent=False)
            self.register_buffer("domain_group_mask", domain_group_mask(owner, moe.n_domains), persistent=False)
            # [n_domains, n_groups]: the groups each domain owns (one each unless domain_experts is unequal)
            group_owner = owner.view(moe.n_groups, -1)[:, 0]
            self.register_buffer(
                "domain_groups", group_owner == torch.arange(moe.n_domains).unsqueeze(1), persistent=False
            )
        self.group_role = group_decision_role(config, layer_idx)
        if self.group_role in RANKING_ROLES:  # per-token group evidence, averaged causally; zero = own scores
            # built without drawing random numbers, so every other weight starts as without the context
            self.group_context = nn.Linear(config.dim, moe.n_groups, bias=False, device="meta")
            self.group_context.weight = nn.Parameter(torch.zeros(moe.n_groups, config.dim))
        self.pending_losses: dict[str, torch.Tensor] = {}
        # the group loss's share of its weight (model.moe.group_loss_warmup); set after each optimizer step
        self.group_loss_scale = 0.0 if moe.group_loss_warmup > 0 else 1.0
        self.last_load: list[float] = []
        self.last_dropped = 0.0
        self.collapse_streak = 0
        self.collapse_warned = False

    def idle_params_per_token(self) -> int:
        """Routed experts a token does not visit."""
        per_expert = sum(p[0].numel() for p in self.experts.parameters())
        return (self.moe.n_routed_experts - self.moe.experts_per_token) * per_expert

    def _selection_bonus(self, domains: torch.Tensor | None) -> torch.Tensor | None:
        """What the tags add to expert selection, in training only: the annealed prior's bonus, or
        -inf outside a tagged token's group (isolated). Untagged and unknown ids get the free last row."""
        if not (self.training and domains is not None) or not self.routes_by_domain():
            return None
        ids = domains.reshape(-1).long().clamp(max=self.moe.n_domains)
        if self.moe.domain_routing == "isolated":
            return torch.where(self.domain_group_mask[ids], 0.0, float("-inf"))
        return self.domain_prior_mask[ids] * (self.moe.domain_prior_bonus * self.domain_prior_scale)

    def routes_by_domain(self) -> bool:
        """Whether the tags shape this layer's routing in training (not an isolated model's free early layers)."""
        moe = self.moe
        return moe.domain_routing == "prior" or (
            moe.domain_routing == "isolated" and self.layer_idx >= moe.isolated_from_layer
        )

    def uses_posterior(self) -> bool:
        """Whether inference ranks expert groups by the document's running group posterior."""
        return self.moe.domain_posterior > 0 and self.moe.n_groups > 1 and not self.training

    def keeps_decode_state(self) -> bool:
        """Whether routing reads running sums over the text so far (a cache carries them between steps)."""
        moe = self.moe
        return moe.n_groups > 1 and self.group_role != "follow" and (moe.domain_posterior > 0 or moe.group_context)

    def new_cache(self, batch: int, max_len: int, device) -> GroupPosteriorCache:
        return GroupPosteriorCache(batch, max_len, self.moe.n_groups, device)

    @staticmethod
    def _running_mean(
        values: torch.Tensor, name: str, cache: GroupPosteriorCache | None, start_pos: int | torch.Tensor
    ) -> torch.Tensor:
        """[batch, seq, n] -> at each position, the mean of `values` from the text's start; a cache adds the
        sums of the positions before `start_pos` and keeps them per position under `name`."""
        sums = values.cumsum(1)
        seen = torch.arange(1, values.shape[1] + 1, device=values.device, dtype=values.dtype).view(1, -1, 1)
        if cache is not None:
            sums = sums + cache.sums_before(name, start_pos).unsqueeze(1)
            before = start_pos.view(-1, 1, 1).to(seen.dtype) if isinstance(start_pos, torch.Tensor) else start_pos
            seen = seen + before
            cache.update(name, sums.detach(), start_pos)
        return sums / seen

    def _rank_groups(
        self,
        shape: tuple[int, int],
        cache: GroupPosteriorCache | None,
        start_pos: int | torch.Tensor,
        context: torch.Tensor | None,
        groups: torch.Tensor,
    ) -> torch.Tensor:
        """What ranks a token's groups instead of its own [T, n_groups] group scores (`groups`): plus the group context
        (`context`), then, at inference with `domain_posterior` W, the causal domain posterior (after DEMix):
        (1 - W) x those scores + W x each group's share of the votes of the tokens so far (a token votes for
        its best group; the prompt and what was generated count)."""
        if context is not None:
            groups = groups + context
        if not self.uses_posterior():
            return groups
        own = groups.view(*shape, -1)
        votes = F.one_hot(own.argmax(-1), own.shape[-1]).to(own.dtype)
        weight = self.moe.domain_posterior
        return ((1 - weight) * own + weight * self._running_mean(votes, "votes", cache, start_pos)).view_as(groups)

    def _group_ranking(
        self,
        shape: tuple[int, int],
        cache: GroupPosteriorCache | None,
        start_pos: int | torch.Tensor,
        context: torch.Tensor | None,
        decision: GroupDecision | None,
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What the router ranks groups by, from the tokens' own group scores (None: by those): a following
        layer takes the leading layer's ranking from `decision`, which the leading layer records."""
        if self.group_role == "follow" and decision is not None and decision.ranking is not None:
            chosen = decision.ranking
            return lambda own: chosen
        if context is None and not self.uses_posterior():
            return None

        def rank(own: torch.Tensor) -> torch.Tensor:
            ranking = self._rank_groups(shape, cache, start_pos, context, own)
            if self.group_role == "lead" and decision is not None:
                decision.ranking = ranking
            return ranking

        return rank

    def forward(
        self,
        x: torch.Tensor,
        domains: torch.Tensor | None = None,
        use_grouped_mm: bool | None = None,
        cache: GroupPosteriorCache | None = None,
        start_pos: int | torch.Tensor = 0,
        decision: GroupDecision | None = None,
    ) -> torch.Tensor:
        """`domains` (per-token ids) matter only with domain routing, and only while training; `cache` and
        `start_pos` only to the domain posterior and group context at inference; `decision` only to the
        group context (the first isolated layer's ranking, which the later ones route by)."""
        batch, seq, dim = x.shape
        # A gradient-checkpointing recompute runs this again inside backward: its loss terms must not
        # leak into the next forward, and its load counts double (shares and signs unchanged).
        self.pending_losses = {}
        flat = x.reshape(-1, dim)
        if torch.is_autocast_enabled(x.device.type):  # cast the T rows once, not their T*K gathered copies
            flat = flat.to(torch.get_autocast_dtype(x.device.type))
        context = None
        if self.group_role in RANKING_ROLES and self.moe.n_groups > 1:
            # read off detached hidden states: the context head learns, the LM's residual stream is not pushed
            evidence = self.group_context(flat.detach().float()).view(batch, seq, -1)
            context = self._running_mean(evidence, "context", cache, start_pos).view(batch * seq, -1)
        ranking = self._group_ranking((batch, seq), cache, start_pos, context, decision)
        routing = self.gate(flat, self._selection_bonus(domains), ranking)
        n_experts, top_k = self.moe.n_routed_experts, self.moe.experts_per_token

        slot_experts = routing.experts.reshape(-1)
        sorted_experts, order = slot_experts.sort(stable=True)
        # Slots per expert from the sorted ids: a fixed shape, where bincount's depends on the data
        # (a host sync on CUDA, and a graph break in every MoE layer under torch.compile).
        bounds = torch.arange(n_experts + 1, device=sorted_experts.device, dtype=sorted_experts.dtype)
        counts = torch.searchsorted(sorted_experts, bounds).diff()
        if self.moe.capacity_factor > 0:
            order, kept = self._apply_capacity(order, sorted_experts, counts, flat.shape[0])
        else:
            kept = counts
        tokens = order // top_k
        expert_out = self.experts(flat[tokens], kept, use_grouped_mm)
        slot_weights = routing.weights.reshape(-1)[order].unsqueeze(-1).to(expert_out.dtype)
        # Back to (token, slot) order, then a sum over the k slots: no atomic adds, so deterministic on
        # GPUs and one bf16 rounding instead of k (as fast as index_add_ on an H100). Dropped slots stay 0.
        # (In place: the out-of-place index_copy would copy the target first. Without a capacity limit
        # `order` covers every slot, so the target need not be zeroed.)
        fresh = expert_out.new_zeros if self.moe.capacity_factor > 0 else expert_out.new_empty
        slots = fresh(flat.shape[0] * top_k, dim).index_copy_(0, order, expert_out * slot_weights)
        out = (slots if top_k == 1 else slots.view(-1, top_k, dim).sum(1)).to(x.dtype)  # a sum over 1 slot copies
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)

        if self.training:
            self._record(counts, kept)
            self._collect_losses(routing, batch, seq, domains, context, flat)
        return out.view(batch, seq, dim)

    def _apply_capacity(
        self, order: torch.Tensor, sorted_experts: torch.Tensor, counts: torch.Tensor, n_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep at most capacity = ceil(factor * T * K / E) slots per expert, earliest tokens first."""
        moe = self.moe
        capacity = math.ceil(moe.capacity_factor * n_tokens * moe.experts_per_token / moe.n_routed_experts)
        rank = torch.arange(len(order), device=order.device) - (counts.cumsum(0) - counts)[sorted_experts]
        return order[rank < capacity], counts.clamp(max=capacity)

    @torch.no_grad()
    def _record(self, counts: torch.Tensor, kept: torch.Tensor) -> None:
        self.load_since_step += counts.to(self.load_since_step.dtype)
        self.dropped_since_step += (counts - kept).sum()

    def _collect_losses(
        self,
        routing: Routing,
        batch: int,
        seq: int,
        domains: torch.Tensor | None,
        context: torch.Tensor | None,
        flat: torch.Tensor,
    ) -> None:
        """Optional sequence-wise balance loss (DeepSeek-V3 eq. 17-20), router z-loss, and with isolated
        routing the group-prediction loss (with a group context, on the scores with and without it, so
        that each token's own scores, which exports rank by, stay trained)."""
        moe = self.moe
        weight = moe.group_loss_weight * self.group_loss_scale
        if moe.domain_routing == "isolated" and self.routes_by_domain() and weight > 0 and domains is not None:
            ids = domains.reshape(-1).long()
            tagged = ids < moe.n_domains
            if bool(tagged.any()):
                # cross-entropy of the tag against the scores group-limited routing ranks groups by
                scores = routing.scores[tagged]
                if 0 < moe.group_loss_dims < flat.shape[-1]:  # the same scores, the rest of the stream detached
                    reserved, rows = moe.group_loss_dims, flat[tagged]
                    read = torch.cat([rows[:, :reserved], rows[:, reserved:].detach()], dim=-1)
                    scores = self.gate.scores_of(self.gate.router_logits(read))
                groups = group_scores(scores, moe.n_groups)
                own = F.cross_entropy(self._domain_logits(groups / moe.group_loss_temperature), ids[tagged])
                self.pending_losses["group"] = weight * own
                if context is not None:
                    with_context = self._domain_logits(groups.detach() + context[tagged])
                    self.pending_losses["group_context"] = weight * F.cross_entropy(with_context, ids[tagged])
        if moe.aux_loss_alpha > 0:
            n_experts, top_k = moe.n_routed_experts, moe.experts_per_token
            chosen = torch.zeros(batch * seq, n_experts, device=routing.scores.device)
            chosen.scatter_(1, routing.experts, 1.0)
            fraction = chosen.view(batch, seq, n_experts).sum(1) * (n_experts / (top_k * seq))
            normalised = routing.scores / routing.scores.sum(-1, keepdim=True)
            probability = normalised.view(batch, seq, n_experts).mean(1)
            self.pending_losses["aux"] = moe.aux_loss_alpha * (fraction * probability).sum(-1).mean()
        if moe.z_loss_weight > 0:
            self.pending_losses["z"] = moe.z_loss_weight * routing.logits.logsumexp(-1).square().mean()

    def _domain_logits(self, groups: torch.Tensor) -> torch.Tensor:
        """[T, n_groups] group logits -> [T, n_domains]: a domain's probability is its groups' summed (exactly
        the group's logit where a domain owns one group)."""
        return groups.unsqueeze(1).masked_fill(~self.domain_groups, float("-inf")).logsumexp(-1)

    def take_losses(self) -> dict[str, torch.Tensor]:
        """Loss terms of the last training forward (cleared so a later forward never reuses them)."""
        losses, self.pending_losses = self.pending_losses, {}
        return losses

    # -- hooks the trainer calls (through Transformer) -------------------------------------------

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """ALF: bias += rate * sign(mean_load - load) from this step's counts; anneal the domain prior."""
        if self.moe.group_loss_warmup > 0:
            self.group_loss_scale = min(1.0, step / self.moe.group_loss_warmup)
        if self.moe.domain_prior:
            anneal = self.moe.domain_prior_anneal_steps
            self.domain_prior_scale.fill_(max(0.0, 1.0 - step / anneal) if anneal > 0 else 0.0)
        load = self.load_since_step
        total = float(load.sum())
        if total == 0:
            return
        if self.moe.bias_update_rate > 0:
            bias = self.gate.e_score_correction_bias
            if self.moe.domain_routing == "isolated":
                # balance among each domain's experts, and keep every domain's mean bias at 0 so that the
                # bias never favours one domain over another when routing picks the group
                bias += self.moe.bias_update_rate * torch.sign(self._domain_mean(load) - load)
                bias.sub_(self._domain_mean(bias))
            else:
                bias += self.moe.bias_update_rate * torch.sign(load.mean() - load).float()
        self.last_load = (load / load.mean()).tolist()
        self.last_dropped = float(self.dropped_since_step) / total
        self._check_collapse(self._top_share(load))
        load.zero_()
        self.dropped_since_step.zero_()

    def _domain_mean(self, values: torch.Tensor) -> torch.Tensor:
        """[E] -> [E]: each expert's value replaced by the mean over its domain's experts."""
        owner = self.expert_domain
        sums = torch.zeros(self.moe.n_domains, dtype=values.dtype, device=values.device).index_add_(0, owner, values)
        return (sums / self.domain_group_mask[:-1].sum(1).to(values.dtype))[owner]

    def _top_share(self, load: torch.Tensor) -> float:
        """How far the busiest expert is from balance towards taking every token it could take (0 = its
        balanced share, k of the experts it competes with; 1 = all the tokens): among the layer's experts, or
        with isolated routing its domain's (a domain's share of the data is no collapse). An absolute share
        would warn on balanced load wherever k is a large part of the experts (k = 2 in groups of 4: 50%
        each). 0 where there are no more experts than a token uses, so there is no choice to collapse."""
        top_k = self.moe.experts_per_token
        if self.moe.domain_routing == "isolated":
            owner = self.expert_domain
            domains = [load[owner == d] for d in range(self.moe.n_domains)]
        else:
            domains = [load]
        shares = []
        for competing in domains:
            if len(competing) > top_k:
                share = float(competing.max() * top_k / competing.sum().clamp(min=1))
                balanced = top_k / len(competing)
                shares.append((share - balanced) / (1 - balanced))
        return max(shares, default=0.0)

    def _check_collapse(self, top_share: float) -> None:
        self.collapse_streak = self.collapse_streak + 1 if top_share >= self.moe.collapse_share else 0
        if self.collapse_streak >= self.moe.collapse_steps and not self.collapse_warned:
            self.collapse_warned = True
            log.warning(
                "warning: MoE layer %d: one expert has been >= %.0f%% of the way from its balanced share to "
                "every token for %d steps in a row (expert collapse); raise model.moe.bias_update_rate (now %g) "
                "to rebalance faster",
                self.layer_idx,
                100 * self.moe.collapse_share,
                self.collapse_streak,
                self.moe.bias_update_rate,
            )

    def training_metrics(self) -> dict[str, float]:
        """Last step's load per expert relative to the mean (1.0 = perfectly balanced)."""
        if not self.last_load:
            return {}
        prefix = f"moe/L{self.layer_idx}"
        metrics = {
            f"{prefix}/load_max_over_mean": max(self.last_load),
            f"{prefix}/load_min_over_mean": min(self.last_load),
        }
        if self.moe.capacity_factor > 0:
            metrics[f"{prefix}/dropped_fraction"] = self.last_dropped
        return metrics

    @staticmethod
    def summary_metrics(layers: list[MoE]) -> dict[str, float]:
        """The most and least loaded expert over all MoE layers (relative to each layer's mean)."""
        loads = [layer.last_load for layer in layers if layer.last_load]
        if not loads:
            return {}
        return {"moe/load_max": max(map(max, loads)), "moe/load_min": min(map(min, loads))}


class GroupPosteriorCache(RowCache):
    """Group routing's decode state: per position, one MoE layer's running sums per group from the
    sequence's start (`votes`: the domain posterior's vote counts; `context`: the group context's
    evidence). Kept per position like keys and values, so that rewriting a position (a rejected
    speculative draft, a new prompt in a reused row) needs no undo."""

    FIELDS = ("votes", "context")

    def __init__(self, batch: int, max_len: int, n_groups: int, device) -> None:
        self.votes = torch.zeros(batch, 1, max_len, n_groups, device=device, dtype=torch.float32)
        self.context = torch.zeros_like(self.votes)

    def sums_before(self, name: str, start_pos: int | torch.Tensor) -> torch.Tensor:
        """[batch, n_groups]: each row's sums at the position before `start_pos` (0 at position 0)."""
        stored = getattr(self, name)
        if isinstance(start_pos, torch.Tensor):
            rows = torch.arange(len(start_pos), device=start_pos.device)
            return stored[rows, 0, (start_pos - 1).clamp(min=0)] * (start_pos > 0).unsqueeze(-1)
        if start_pos == 0:
            return stored.new_zeros(stored.shape[0], stored.shape[-1])
        return stored[:, 0, start_pos - 1]

    def update(self, name: str, sums: torch.Tensor, start_pos: int | torch.Tensor) -> None:
        """Store [batch, seq, n_groups] running sums at the positions from `start_pos`."""
        self._write(name, sums.unsqueeze(1), start_pos)


def domain_expert_mask(n_domains: int, n_experts: int) -> torch.Tensor:
    """[n_domains + 1, E] with 1 where expert e belongs to domain d (round-robin); last row: untagged."""
    experts = torch.arange(n_experts)
    domains = torch.arange(n_domains).unsqueeze(1)
    mask = experts % n_domains == domains if n_domains <= n_experts else experts == domains % n_experts
    return torch.cat([mask.float(), torch.zeros(1, n_experts)])


def expert_domains(moe: MoEConfig) -> torch.Tensor:
    """[E] long: the domain owning each routed expert with isolated routing (contiguous, in domain order)."""
    counts = moe.domain_expert_counts()
    repeats = torch.tensor(counts, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(counts)), repeats, output_size=sum(counts))  # also on meta


def domain_group_mask(owner: torch.Tensor, n_domains: int) -> torch.Tensor:
    """[n_domains + 1, E] bool, True where expert e is in domain d's groups (`owner`: each expert's
    domain); the last row, for untagged tokens, allows every expert."""
    mask = owner == torch.arange(n_domains).unsqueeze(1)
    return torch.cat([mask, torch.ones(1, len(owner), dtype=torch.bool)])
