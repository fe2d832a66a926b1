"""Mixtral: Mistral with a softmax-routed MoE in every layer."""

from __future__ import annotations

from typing import Any

from darkhorse.config import ModelConfig
from darkhorse.interop import capabilities
from darkhorse.interop.hf.base import SpecialTokens
from darkhorse.interop.hf.llama import MistralAdapter
from darkhorse.interop.hf.tensor_maps import TensorMap, expert_maps, moe_router_maps
from darkhorse.interop.safetensors_io import SafetensorsDir

MIXTRAL_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


class MixtralAdapter(MistralAdapter):
    """Softmax-routed MoE in every layer, GQA attention, no shared experts."""

    architecture = "MixtralForCausalLM"
    model_type = "mixtral"

    def export_refusals(self, config: ModelConfig) -> list[str]:
        reasons = [r for r in super().export_refusals(config) if not r.startswith("model.ffn=")]
        if config.ffn != "moe":
            return [*reasons, "model.ffn=dense (no experts)"]
        return reasons + capabilities.mixtral_moe_refusals(config.moe)

    def config_to_hf(self, config: ModelConfig, tokens: SpecialTokens, dtype: str) -> dict[str, Any]:
        hf = super().config_to_hf(config, tokens, dtype)
        for key in ("attention_bias", "mlp_bias"):
            del hf[key]
        hf.update(
            intermediate_size=config.moe.moe_intermediate_size,
            num_local_experts=config.moe.n_routed_experts,
            num_experts_per_tok=config.moe.experts_per_token,
            router_aux_loss_coef=config.moe.aux_loss_alpha,
            router_jitter_noise=0.0,
            output_router_logits=False,
            sliding_window=None,
        )
        return hf

    def config_from_hf(self, hf: dict[str, Any], where: str, source: SafetensorsDir) -> dict[str, Any]:
        model = super().config_from_hf(hf, where, source)
        experts = int(hf["num_local_experts"])
        model["ffn"] = "moe"
        model["moe"] = {
            "n_routed_experts": experts,
            "n_shared_experts": 0,
            "experts_per_token": int(hf["num_experts_per_tok"]),
            "moe_intermediate_size": model["ffn_dim"],
            "scoring": "softmax",
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.0,
            "first_k_dense": 0,
            "bias_update_rate": 0.0,  # a selection bias would make the model non-Mixtral (see export)
        }
        return model

    def ffn_maps(self, config: ModelConfig, layer: int, ours: str, theirs: str) -> list[TensorMap]:
        names = {p: f"{theirs}block_sparse_moe.experts.{{j}}.{w}.weight" for p, w in MIXTRAL_EXPERT_NAMES.items()}
        router = moe_router_maps(
            config,
            layer,
            ours,
            theirs + "block_sparse_moe.gate",
            bias_refusal=capabilities.MIXTRAL_SELECTION_BIAS,
        )
        router[0] = TensorMap(router[0].ours, router[0].hf, alt=(theirs + "mlp.gate.weight",))
        return router + expert_maps(config, ours, names, theirs + "mlp.experts.")
