"""Typed configs, named presets and `key=value` overrides.

A run is described by one `RunConfig` (a `ModelConfig` and a `TrainConfig`). Presets are YAML
files shipped in `darkhorse/presets/`; a user file and command-line overrides are layered on top,
and every key is checked against the dataclasses so a typo is an error that names the closest
valid keys instead of a silently ignored setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import operator
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from darkhorse.errors import ConfigError

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")  # what torch.device accepts that we use
MAX_DOMAINS = 256  # domain ids are stored as uint8 (prepared data, MoE routing statistics)
PRESET_ALIASES = {"1b": "genesis-1b", "5b": "genesis-5b", "30b": "genesis-30b", "500b": "genesis-500b"}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def range_problem(
    value: float, *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> str | None:
    """What is wrong with `value` for the bounds given (None if nothing): the one numeric check that
    config values and command-line arguments share. NaN and infinity never pass."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    tests = ((">=", ge, operator.ge), (">", gt, operator.gt), ("<=", le, operator.le), ("<", lt, operator.lt))
    given = [(sign, bound, test) for sign, bound, test in tests if bound is not None]
    if all(test(value, bound) for _, bound, test in given):
        return None
    return "must be " + " and ".join(f"{sign} {bound}" for sign, bound, _ in given)


def check_range(name: str, value: float, **bounds: float) -> None:
    """Raise a ConfigError naming `name` when `value` is outside the bounds (see `range_problem`)."""
    problem = range_problem(value, **bounds)
    _require(problem is None, f"{name} {problem}, got {value!r}")


def number_arg(kind: type = int, **bounds: float) -> Callable[[str], float]:
    """An argparse `type=` that parses `kind` and checks the bounds, so a bad value is a usage error
    (`argument --top-k: must be >= 0, got -3`) before any work starts."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        problem = range_problem(value, **bounds)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def device_arg(text: str) -> str:
    """An argparse `type=` for --device: auto, cpu, mps, cuda[:N] or xpu[:N] (checked without importing torch)."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


@dataclass
class RopeScalingConfig:
    """Context extension to `factor` x `original_max_seq_len` positions: 'yarn' (DeepSeek, Qwen) or
    'llama3' (Llama 3.1+: wavelengths between original/high_freq_factor and original/low_freq_factor
    are blended); type 'none' turns it off."""

    type: str = "none"
    factor: float = 1.0
    original_max_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only

    def __post_init__(self) -> None:
        _one_of("model.rope_scaling.type", self.type, ("none", "yarn", "llama3"))
        _require(self.factor >= 1.0, "model.rope_scaling.factor must be >= 1")
        _require(
            0 < self.low_freq_factor < self.high_freq_factor,
            "model.rope_scaling needs 0 < low_freq_factor < high_freq_factor",
        )


@dataclass
class MLAConfig:
    """Multi-head Latent Attention sizes (DeepSeek-V2/V3 names)."""

    q_lora_rank: int = 0  # 0 = queries are not compressed
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32

    def __post_init__(self) -> None:
        _require(self.q_lora_rank >= 0, "model.mla.q_lora_rank must be >= 0")
        _require(self.kv_lora_rank > 0, "model.mla.kv_lora_rank must be > 0")
        # qk_nope_head_dim 0: every q/k dim is positional (RoPE); the keys then carry no content part
        _require(self.qk_nope_head_dim >= 0, "model.mla.qk_nope_head_dim must be >= 0")
        _require(self.v_head_dim > 0, "model.mla.v_head_dim must be > 0")
        _require(
            self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
            f"model.mla.qk_rope_head_dim must be a positive even number, got {self.qk_rope_head_dim}",
        )


@dataclass
class MoEConfig:
    """DeepSeek-style routed + shared experts, balanced by a selection bias (ALF)."""

    n_routed_experts: int = 8
    n_shared_experts: int = 1
    experts_per_token: int = 2
    moe_intermediate_size: int = 256
    scoring: str = "sigmoid"  # sigmoid (DeepSeek-V3) or softmax (Mixtral)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense: int = 1
    n_groups: int = 1
    topk_groups: int = 1
    capacity_factor: float = 0.0  # 0 = no capacity limit (no dropped tokens)
    bias_update_rate: float = 1e-3  # ALF gamma; 0 freezes the bias
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss, off by default
    z_loss_weight: float = 0.0  # router z-loss, off by default
    n_domains: int = 0  # domains in the training data (the trainer sets it from meta.json); 0 = untagged
    # none | prior (an annealed selection bonus towards each domain's experts) | isolated (one expert
    # group per domain: tagged tokens route inside their group, the router learns to predict it)
    domain_routing: str = "none"
    domain_prior: bool = False  # the older spelling of domain_routing=prior
    # isolated: the routed experts each domain owns, in the prepared data's domain order (they sum to
    # n_routed_experts); empty = an equal share each. A domain owning more experts owns more groups: the
    # group size is the counts' greatest common divisor, so exports keep DeepSeek's equal groups
    domain_experts: list[int] = field(default_factory=list)
    group_loss_weight: float = 0.1  # isolated: weight of the router's group-prediction loss
    # its logits are the group scores (sums of two sigmoids, in [0, 2]) / this: below 1 the loss can
    # saturate once the right group leads, where at 1 even perfect routing pays ~0.24 nats and keeps pushing
    group_loss_temperature: float = 1.0
    # isolated: the group loss's gradient reaches only the first N dims of the router's input (0, or N >=
    # model.dim: all), so the residual stream is asked to carry the domain in those dims alone. 16 against
    # the whole stream: kinds3 at width 256 -0.5 to -1.7% bits/byte in 3 of 3 seeds (thirteenth session),
    # the demo corpus -5.8% over 10 seeds, better in 8 (docs/experiments.md, fourteenth session)
    group_loss_dims: int = 16
    # isolated: the group loss's weight rises linearly from 0 to group_loss_weight over this many steps
    # (0 = full weight from the start), so the LM shapes the residual stream before the loss pushes it
    group_loss_warmup: int = 0
    # isolated: MoE layers before this layer index route freely (their groups by their own scores, with
    # no tags and no group loss), so only the later layers' hidden states are pushed to carry the domain
    # (0 = every MoE layer isolated)
    isolated_from_layer: int = 0
    # inference with expert groups: rank a token's groups by (1 - w) x its own group scores + w x each
    # group's share of the tokens so far that chose it (a causal domain posterior); 0 = each token's own
    # scores, as exported models (HF, GGUF) route
    domain_posterior: float = 0.0
    # isolated: the first isolated MoE layer ranks the groups by a token's own group scores plus a learned
    # context feature, the causal running mean of per-token group evidence (a linear read of each token's
    # hidden state) from the text's start, trained by the group loss; the later isolated layers route in the
    # groups it chose (an MTP block ranks its own); darkhorse inference only (exports rank by own scores)
    group_context: bool = False
    domain_prior_bonus: float = 1.0
    domain_prior_anneal_steps: int = 200
    # warn when one expert's share of the tokens is this far from its balanced share (0) towards all of them (1),
    # among a layer's experts (with isolated routing, its group's) ...
    collapse_share: float = 0.5
    collapse_steps: int = 50  # ... for this many optimizer steps in a row

    def __post_init__(self) -> None:
        _one_of("model.moe.scoring", self.scoring, ("sigmoid", "softmax"))
        _require(self.n_routed_experts >= 1, "model.moe.n_routed_experts must be >= 1")
        _one_of("model.moe.domain_routing", self.domain_routing, ("none", "prior", "isolated"))
        if self.domain_prior and self.domain_routing == "none":
            self.domain_routing = "prior"
        _require(
            not (self.domain_prior and self.domain_routing == "isolated"),
            "model.moe.domain_prior and domain_routing=isolated exclude each other",
        )
        self.domain_prior = self.domain_routing == "prior"
        _require(
            not self.domain_experts or self.domain_routing == "isolated",
            "model.moe.domain_experts partitions the experts among domains: it needs model.moe.domain_routing=isolated",
        )
        if self.domain_routing == "isolated" and self.n_domains > 0:
            self._partition_by_domain()
        _require(
            1 <= self.experts_per_token <= self.n_routed_experts,
            f"model.moe.experts_per_token ({self.experts_per_token}) must be between 1 and "
            f"model.moe.n_routed_experts ({self.n_routed_experts})",
        )
        _require(self.n_shared_experts >= 0, "model.moe.n_shared_experts must be >= 0")
        _require(
            self.n_groups >= 1 and self.n_routed_experts % self.n_groups == 0,
            f"model.moe.n_routed_experts ({self.n_routed_experts}) must divide into "
            f"model.moe.n_groups ({self.n_groups})",
        )
        _require(
            1 <= self.topk_groups <= self.n_groups,
            f"model.moe.topk_groups ({self.topk_groups}) must be between 1 and n_groups ({self.n_groups})",
        )
        _require(
            self.experts_per_token <= self.topk_groups * (self.n_routed_experts // self.n_groups),
            "model.moe.experts_per_token exceeds the experts in the top groups",
        )
        _require(self.capacity_factor >= 0, "model.moe.capacity_factor must be >= 0")
        _require(self.moe_intermediate_size > 0, "model.moe.moe_intermediate_size must be > 0")
        _require(self.routed_scaling_factor > 0, "model.moe.routed_scaling_factor must be > 0")
        for name in (
            "bias_update_rate",
            "aux_loss_alpha",
            "z_loss_weight",
            "domain_prior_anneal_steps",
            "group_loss_weight",
            "group_loss_warmup",
            "isolated_from_layer",
            "group_loss_dims",
        ):
            _require(getattr(self, name) >= 0, f"model.moe.{name} must be >= 0")
        _require(
            0 <= self.n_domains <= MAX_DOMAINS,
            f"model.moe.n_domains must be between 0 and {MAX_DOMAINS} (domain ids are uint8)",
        )
        _require(0 < self.collapse_share <= 1, "model.moe.collapse_share must be in (0, 1]")
        _require(self.group_loss_temperature > 0, "model.moe.group_loss_temperature must be > 0")
        _require(0 <= self.domain_posterior <= 1, "model.moe.domain_posterior must be in [0, 1]")
        _require(
            self.domain_posterior == 0 or self.domain_routing == "isolated",
            "model.moe.domain_posterior ranks the domains' expert groups: it needs model.moe.domain_routing=isolated",
        )
        _require(
            not self.group_context or self.domain_routing == "isolated",
            "model.moe.group_context ranks the domains' expert groups: it needs model.moe.domain_routing=isolated",
        )
        _require(self.collapse_steps >= 1, "model.moe.collapse_steps must be >= 1")

    def _partition_by_domain(self) -> None:
        """Isolated routing: the routed experts split into contiguous groups of equal size, in domain
        order; each domain owns `domain_experts` of them (an equal share when none are given)."""
        experts, domains = self.n_routed_experts, self.n_domains
        _require(
            experts >= domains,
            f"model.moe.domain_routing=isolated needs at least one routed expert per domain: "
            f"{experts} routed experts for {domains} domains",
        )
        counts = self.domain_expert_counts()
        if self.domain_experts:
            _require(
                len(counts) == domains and min(counts) >= 1 and sum(counts) == experts,
                f"model.moe.domain_experts={counts} must give each of the {domains} domains at least one "
                f"routed expert, {experts} in all",
            )
        else:
            even = [experts // domains + (d < experts % domains) for d in range(domains)]
            _require(
                experts % domains == 0,
                f"model.moe.domain_routing=isolated splits the routed experts into equal groups, one per domain: "
                f"{experts} routed experts do not divide into {domains} domains (use a multiple of {domains}, "
                f"or say how many each domain owns, e.g. model.moe.domain_experts=[{','.join(map(str, even))}])",
            )
        # groups as large as every domain's experts allow (n_groups given: as large as it says)
        size = math.gcd(*counts) if self.n_groups == 1 else experts // max(1, self.n_groups)
        _require(
            self.n_groups == 1 or (experts % self.n_groups == 0 and all(count % size == 0 for count in counts)),
            f"model.moe.domain_routing=isolated needs every domain's experts ({', '.join(map(str, counts))}) "
            f"to be whole expert groups: not model.moe.n_groups={self.n_groups}",
        )
        self.n_groups = experts // size
        # a token's k experts fit in its top groups: one group per domain, or enough small ones
        self.topk_groups = min(self.n_groups, max(self.topk_groups, -(-self.experts_per_token // size)))

    def limiting_groups(self) -> tuple[int, int]:
        """(n_groups, topk_groups) for an engine with DeepSeek's group-limited routing (HF, llama.cpp): (1, 1)
        where the limit changes nothing (every group kept, or groups of one expert, of which at least k are)."""
        unlimited = self.n_groups in (self.topk_groups, self.n_routed_experts)
        return (1, 1) if unlimited else (self.n_groups, self.topk_groups)

    def domain_expert_counts(self) -> list[int]:
        """The routed experts each domain owns with isolated routing (contiguous, in domain order)."""
        if self.domain_experts:
            return list(self.domain_experts)
        return [self.n_routed_experts // self.n_domains] * self.n_domains if self.n_domains else []


@dataclass
class MHCConfig:
    """Manifold-constrained hyper-connections: n residual streams mixed by doubly-stochastic matrices."""

    expansion: int = 4
    sinkhorn_iters: int = 20

    def __post_init__(self) -> None:
        _require(self.expansion >= 1, "model.mhc.expansion must be >= 1")
        _require(self.sinkhorn_iters >= 1, "model.mhc.sinkhorn_iters must be >= 1")


@dataclass
class ModelConfig:
    """One decoder-only transformer; attention, FFN and residual are pluggable by name."""

    vocab_size: int = 4096
    n_layers: int = 4
    dim: int = 256
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # GQA width of one head; 0 = dim // n_heads (set on load, so saved configs hold it)
    ffn_dim: int = 1024
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    attention: str = "gqa"  # gqa | mla
    attention_bias: bool = False  # GQA q/k/v projection biases (Qwen2)
    qk_norm: bool = False  # GQA RMSNorm on each query/key head before RoPE (Qwen3)
    ffn: str = "dense"  # dense | moe
    # dense FFNs: swiglu (gated, LLaMA), or a plain up/down MLP with gelu (GPT-2) or relu2 (squared ReLU,
    # modded-nanogpt); the plain MLP has two matrices, not three, so 1.5x ffn_dim matches SwiGLU's size
    ffn_activation: str = "swiglu"
    positions: str = "rope"  # rope | learned (GPT-2's absolute position embeddings added to the tokens)
    logit_softcap: float = 0.0  # cap * tanh(logits / cap) on the output logits (Gemma 2); 0 = off
    zero_init_out: bool = False  # attention and FFN output projections start at zero (modded-nanogpt)
    # value embeddings (modded-nanogpt): the first N layers each look the input tokens up in a table of their
    # own and add the result to their attention values; 0 = off
    value_embeds: int = 0
    # smear (modded-nanogpt, nanochat): each token's embedding gets a learned, gated share of the previous
    # token's, so layer 0's keys already carry "what came before me" and copying (induction) needs no
    # previous-token head learned first: none | embed (the residual stream's input) | kv (only what layer 0's
    # keys and values are computed from) | attn (what layer 0's attention reads, queries too); darkhorse only
    # (exports refuse it)
    smear: str = "none"
    # the smear's per-channel scale at the start: 0 starts as the model without it (the gate learns from the
    # second step); 1 mixes half the previous token in from the first (the gate starts at 0.5)
    smear_scale: float = 0.0
    # how many tokens back the smear reaches: 1 the previous token; K mixes x_{t-1} .. x_{t-K}, each with a gate
    # and scale of its own (a short causal depthwise convolution, cf. Allen-Zhu's "Canon layers")
    smear_width: int = 1
    residual: str = "plain"  # plain | mhc
    mtp_depth: int = 0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    mhc: MHCConfig = field(default_factory=MHCConfig)

    def __post_init__(self) -> None:
        _one_of("model.attention", self.attention, ("gqa", "mla"))
        _one_of("model.ffn", self.ffn, ("dense", "moe"))
        _one_of("model.residual", self.residual, ("plain", "mhc"))
        _one_of("model.ffn_activation", self.ffn_activation, ("swiglu", "gelu", "relu2"))
        _one_of("model.positions", self.positions, ("rope", "learned"))
        _one_of("model.smear", self.smear, ("none", "embed", "kv", "attn"))
        _require(
            self.smear in ("none", "embed") or self.residual == "plain",
            f"model.smear={self.smear} needs model.residual=plain (layer 0's keys read one stream)",
        )
        _require(
            self.positions == "rope" or self.attention == "gqa",
            "model.positions=learned needs model.attention=gqa (MLA carries its positions in RoPE channels)",
        )
        check_range("model.logit_softcap", self.logit_softcap, ge=0)
        check_range("model.smear_scale", self.smear_scale, ge=0)
        check_range("model.smear_width", self.smear_width, ge=1, le=8)
        check_range("model.value_embeds", self.value_embeds, ge=0, le=self.n_layers)
        _require(
            self.value_embeds == 0 or self.attention == "gqa",
            "model.value_embeds needs model.attention=gqa (MLA rebuilds its values from a latent)",
        )
        for name in ("vocab_size", "n_layers", "dim", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            check_range(f"model.{name}", getattr(self, name), gt=0)
        for name in ("rope_theta", "norm_eps", "init_std"):
            check_range(f"model.{name}", getattr(self, name), gt=0)
        _require(self.head_dim >= 0, "model.head_dim must be >= 0 (0 = dim / n_heads)")
        if self.head_dim == 0:
            _require(
                self.dim % self.n_heads == 0,
                f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads}), or set model.head_dim",
            )
            self.head_dim = self.dim // self.n_heads
        _require(
            self.n_heads % self.n_kv_heads == 0,
            f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})",
        )
        _require(self.attention == "mla" or self.head_dim % 2 == 0, "model head_dim must be even for RoPE")
        _require(self.mtp_depth >= 0, "model.mtp_depth must be >= 0")
        if self.ffn == "moe":
            _require(
                0 <= self.moe.first_k_dense <= self.n_layers,
                "model.moe.first_k_dense must be between 0 and model.n_layers",
            )

    @property
    def padded_vocab_size(self) -> int:
        """Vocab rounded up to a multiple of 64 so the embedding and head matmuls stay aligned."""
        return -(-self.vocab_size // 64) * 64


@dataclass
class TrainConfig:
    """Everything about one training run that is not the model's shape."""

    # tuned: the preset's measured-best recipe; classic: the one it replaced (the preset's `classic:` overlay,
    # applied under the user's config file and overrides, so a user's own setting still wins)
    recipe: str = "tuned"
    seq_len: int = 256
    batch_size: int = 8  # micro-batch, sequences per forward pass
    grad_accum: int = 1
    # warm-ups of the batch (rows from 1) and of the window length (from 16 tokens), linear over these
    # first optimizer steps, to full batch_size and seq_len; 0 = off
    batch_warmup_steps: int = 0
    seq_warmup_steps: int = 0
    max_steps: int = 1000  # with a time budget (minutes), a cap; 0 = none
    minutes: float = 0.0  # wall-clock budget: the schedule follows the time spent and the run stops at it; 0 = off
    # with a time budget, a step floor: the run goes on past the clock until this many steps, and the schedule
    # follows whichever of time and steps is less far along (a slow machine still gets the steps); 0 = none
    min_steps: int = 0
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd | constant
    wsd_decay_fraction: float = 0.2
    optimizer: str = "adamw"  # adamw | muon (Muon on 2-D/3-D matrices)
    muon_lr: float = 0.02
    # Muon's Newton-Schulz in bf16 (torch's choice) or fp32; auto: bf16 on CUDA and on CPUs with native bf16
    # (AVX512-BF16, AMX), fp32 elsewhere, where a bf16 matmul is emulated and 20-50x slower than fp32's
    muon_precision: str = "auto"
    embedding_lr: float = 0.0  # the token (and position) embeddings' lr; 0 = train.lr
    head_lr: float = 0.0  # an untied output head's lr (model.tie_embeddings=false); 0 = train.lr
    # the MoE routers' lr on the element-wise optimizer (AdamW or Lion, as the embeddings); 0 = trained as the
    # other matrices (by Muon at muon_lr under optimizer=muon)
    router_lr: float = 0.0
    scalar_optimizer: str = "adamw"  # adamw | lion: for embeddings, norms and other non-matrix params
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    grad_checkpointing: bool = False
    compile: bool | str = "auto"  # true | false | auto (on for CUDA, where it pays; off on CPU and MPS)
    kernels: str = "auto"  # auto | torch | liger (fused CUDA kernels; auto: liger on CUDA when it imports)
    eval_interval: int = 100
    eval_steps: int = 10
    save_interval: int = 200
    keep_last: int = 3
    log_interval: int = 10
    seed: int = 1337
    mtp_weight: float = 0.3
    loss_mask: bool = True  # learn only tokens the data's loss mask marks (chat: the assistant's replies)
    align_windows: bool = False  # start each training window at a document's BOS (short chat records keep their prompt)
    # > 0: a curriculum: the --data sources are read one after another, each alone for this many steps (the last
    # to the end), instead of mixed by weight; validation still mixes them by weight
    source_steps: int = 0
    max_bad_steps: int = 5  # stop after this many NaN/inf losses in a row
    device: str = "auto"
    parallel: str = "none"  # none | ddp | fsdp (FSDP2, ZeRO-3); ddp and fsdp run under torchrun
    dist_timeout: int = 600  # seconds a rank waits for the others before it gives up (a rank died)
    expert_parallel: int = 1  # ranks each MoE layer's routed experts are split over (ddp; all ranks)

    def __post_init__(self) -> None:
        _one_of("train.recipe", self.recipe, ("tuned", "classic"))
        _one_of("train.schedule", self.schedule, ("cosine", "wsd", "constant"))
        _one_of("train.optimizer", self.optimizer, ("adamw", "muon"))
        _one_of("train.muon_precision", self.muon_precision, ("auto", "bf16", "fp32"))
        _one_of("train.scalar_optimizer", self.scalar_optimizer, ("adamw", "lion"))
        _one_of("train.dtype", self.dtype, ("fp32", "bf16", "fp16"))
        if isinstance(self.compile, str):
            word = self.compile.strip().lower()
            _one_of("train.compile", word, ("true", "false", "auto", "yes", "no", "1", "0"))
            self.compile = word if word == "auto" else word in ("true", "yes", "1")
        _one_of("train.kernels", self.kernels, ("auto", "torch", "liger"))
        _require(
            bool(DEVICE_PATTERN.fullmatch(self.device)),
            f"train.device must be auto, cpu, cuda[:N] or mps, got {self.device!r}",
        )
        for name in ("seq_len", "batch_size", "grad_accum", "log_interval", "keep_last", "max_bad_steps"):
            check_range(f"train.{name}", getattr(self, name), gt=0)
        check_range("train.minutes", self.minutes, ge=0)  # 0: no time budget
        if self.minutes == 0:
            _require(self.max_steps > 0, f"train.max_steps must be > 0 without train.minutes, got {self.max_steps}")
        check_range("train.max_steps", self.max_steps, ge=0)  # 0: no step cap under a time budget
        check_range("train.min_steps", self.min_steps, ge=0)
        if self.min_steps:  # max_steps still caps it, as it caps the budget
            _require(self.minutes > 0, f"train.min_steps ({self.min_steps}) is a floor under train.minutes, which is 0")
        for name in (
            "warmup_steps",
            "batch_warmup_steps",
            "seq_warmup_steps",
            "eval_interval",
            "eval_steps",
            "save_interval",
            "source_steps",
            "grad_clip",
            "weight_decay",
        ):
            check_range(f"train.{name}", getattr(self, name), ge=0)  # 0: off
        check_range("train.seed", self.seed, ge=0)
        check_range("train.lr", self.lr, gt=0)
        check_range("train.muon_lr", self.muon_lr, gt=0)
        check_range("train.embedding_lr", self.embedding_lr, ge=0)
        check_range("train.head_lr", self.head_lr, ge=0)
        check_range("train.router_lr", self.router_lr, ge=0)
        check_range("train.mtp_weight", self.mtp_weight, ge=0)
        check_range("train.beta1", self.beta1, ge=0, lt=1)
        check_range("train.beta2", self.beta2, ge=0, lt=1)
        check_range("train.min_lr_ratio", self.min_lr_ratio, ge=0, le=1)
        check_range("train.wsd_decay_fraction", self.wsd_decay_fraction, gt=0, le=1)
        _one_of("train.parallel", self.parallel, ("none", "ddp", "fsdp"))
        check_range("train.dist_timeout", self.dist_timeout, gt=0)
        check_range("train.expert_parallel", self.expert_parallel, ge=1)


@dataclass
class RunConfig:
    name: str = ""
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _require(
            self.train.seq_len <= self.model.max_seq_len,
            f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building configs from dicts, with type coercion and closest-key errors


def _keys_of(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_keys_of(hints[f.name], key + "."))
    return keys


def _unknown_key(key: str) -> ConfigError:
    valid = _keys_of(RunConfig)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:  # fall back to matching the last part of a dotted key
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.7)][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(value: Any, target: Any, key: str) -> Any:
    try:
        if target is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes")
            return bool(value)
        if target is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if target is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
            return number
        if target is str:
            return str(value)
        if target == list[int]:  # YAML's [2, 3, 4], or "2,3,4" from a command line
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list):
                raise ValueError(value)
            return [_coerce(item, int, key) for item in items if not (isinstance(item, str) and not item.strip())]
    except (TypeError, ValueError, OverflowError):
        name = getattr(target, "__name__", str(target))
        raise ConfigError(f"config key '{key}' expects {name}, got {value!r}") from None
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            while isinstance(value, dict) and value:  # report `modle.dim`, not just `modle`
                key, value = f"{key}.{next(iter(value))}", next(iter(value.values()))
            raise _unknown_key(prefix + key)
        target = hints[key]
        if dataclasses.is_dataclass(target):
            kwargs[key] = _build(target, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, target, prefix + key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["train.lr=3e-4", "model.n_layers=4"]` -> nested dict (values coerced later by type)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.lr=3e-4)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        parsed = yaml.safe_load(value) if value.strip() else value
        node[parts[-1]] = value if isinstance(parsed, (int, float)) and not isinstance(parsed, bool) else parsed
    return nested


def list_presets() -> list[str]:
    folder = resources.files("darkhorse") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_dict(name: str) -> dict[str, Any]:
    name = PRESET_ALIASES.get(name.lower(), name)
    path = resources.files("darkhorse") / "presets" / f"{name}.yaml"
    if not path.is_file():
        names = list_presets()
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown preset '{name}'. Available: {', '.join(names)}.{hint}")
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", name)
    return data


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'model' and/or 'train' sections")
    return data or {}


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    return _build(RunConfig, data)


def load_run_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Layer, in order: `base` (e.g. a checkpoint's config), preset, the preset's `classic:` overlay when
    `train.recipe=classic` is set anywhere, YAML file, `key=value` overrides."""
    data: dict[str, Any] = dict(base or {})
    classic: dict[str, Any] = {}
    if preset:
        preset_data = preset_dict(preset)
        classic = preset_data.pop("classic", None) or {}
        data = _merge(data, preset_data)
    user = [load_yaml_file(config_file)] if config_file else []
    user.append(parse_overrides(overrides))
    trains = [layer.get("train") for layer in [data, *user]]
    recipes = [train["recipe"] for train in trains if isinstance(train, dict) and "recipe" in train]
    if recipes and recipes[-1] == "classic":
        data = _merge(data, classic)
    for layer in user:
        data = _merge(data, layer)
    return run_config_from_dict(data)
