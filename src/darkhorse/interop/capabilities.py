"""What the export targets cannot represent, written once for the HF and GGUF exporters.

Each rule returns the reasons (empty when the config fits) in the words the user reads, so an export
that fails lists every obstacle at once and HF and GGUF refuse the same model with the same reasons.
Refusals that belong to one target alone (llama.cpp's YaRN scaling, its Lite-only uncompressed
queries) stay with that target's exporter.
"""

from __future__ import annotations

import logging
from pathlib import Path

from darkhorse.config import ModelConfig, MoEConfig
from darkhorse.errors import DarkhorseError

log = logging.getLogger("darkhorse")

# Mixtral (HF MixtralForCausalLM, llama.cpp's llama MoE) picks experts by router score alone.
MIXTRAL_SELECTION_BIAS = (
    "Mixtral selects experts by router score alone, so a nonzero selection bias cannot be exported "
    "(fine-tune with model.moe.bias_update_rate=0)"
)


def failed(*checks: tuple[bool, str]) -> list[str]:
    """The reasons of the checks whose condition holds."""
    return [reason for condition, reason in checks if condition]


def refusal(target: str, reasons: list[str], source: str | Path | None = None) -> DarkhorseError:
    """The one error that names every reason `target` cannot hold the model (of checkpoint `source`)."""
    where = f"{source}: " if source else ""
    return DarkhorseError(f"{where}cannot export to {target}: {'; '.join(reasons)}")


def architecture_refusals(config: ModelConfig) -> list[str]:
    """Blocks that no exported architecture (Llama, Qwen, Mixtral, DeepSeek; llama.cpp's kin) computes:
    mHC residual streams, ungated MLPs, learned absolute positions, soft-capped logits, value embeddings,
    the embedding smear."""
    instead = "has no transformers or llama.cpp architecture here; use --format safetensors or pt"
    return failed(
        (config.residual != "plain", f"model.residual={config.residual} (hyper-connections) {instead}"),
        (config.ffn_activation != "swiglu", f"model.ffn_activation={config.ffn_activation} (an ungated MLP) {instead}"),
        (config.positions != "rope", f"model.positions={config.positions} (absolute position embeddings) {instead}"),
        (config.logit_softcap > 0, f"model.logit_softcap={config.logit_softcap:g} (soft-capped logits) {instead}"),
        (config.value_embeds > 0, f"model.value_embeds={config.value_embeds} (value embeddings) {instead}"),
        (
            config.smear != "none",
            f"model.smear={config.smear} (each token's embedding mixed with the previous token's) {instead}",
        ),
    )


def warn_darkhorse_only_routing(moe: MoEConfig, target: str) -> None:
    """Say that `target` routes each token by its own group scores: what ranks the expert groups over the
    text so far (the domain posterior, the group context) is darkhorse inference only."""
    if moe.n_groups > 1 and (moe.group_context or moe.domain_posterior > 0):
        log.warning(
            "warning: the %s export ranks each token's expert groups by its own scores; "
            "model.moe.group_context and model.moe.domain_posterior are darkhorse inference only",
            target,
        )


def dropped_tokens_refusals(moe: MoEConfig) -> list[str]:
    """A capacity limit drops tokens; no exported MoE architecture ever does."""
    return failed(
        (
            moe.capacity_factor > 0,
            "model.moe.capacity_factor > 0 (drops tokens, which transformers and llama.cpp never do)",
        )
    )


def mixtral_moe_refusals(moe: MoEConfig) -> list[str]:
    """Mixtral's MoE: softmax over every expert, top-k renormalised, every layer MoE, nothing shared."""
    return failed(
        (moe.scoring != "softmax", f"model.moe.scoring={moe.scoring} (Mixtral routes by softmax)"),
        (moe.n_shared_experts > 0, "model.moe.n_shared_experts > 0 (Mixtral has no shared experts)"),
        (moe.first_k_dense > 0, "model.moe.first_k_dense > 0 (every Mixtral layer is MoE)"),
        (not moe.norm_topk_prob, "model.moe.norm_topk_prob=false (Mixtral renormalises the top-k)"),
        (moe.routed_scaling_factor != 1.0, "model.moe.routed_scaling_factor != 1"),
        (moe.n_groups > 1, "model.moe.n_groups > 1 (group-limited routing)"),
    ) + dropped_tokens_refusals(moe)


def deepseek_moe_refusals(moe: MoEConfig) -> list[str]:
    """DeepSeek's MoE (HF DeepseekV3, llama.cpp's deepseek2) always runs shared experts beside the routed ones."""
    return failed(
        (moe.n_shared_experts < 1, "model.moe.n_shared_experts=0 (DeepSeek's MoE has shared experts)"),
    ) + dropped_tokens_refusals(moe)
