"""DeepseekV3: MLA attention, a sigmoid-routed MoE with shared experts, and MTP layers."""

from __future__ import annotations

from typing import Any

from darkhorse.config import ModelConfig
from darkhorse.errors import DarkhorseError
from darkhorse.interop import capabilities
from darkhorse.interop.hf.base import HFAdapter, SpecialTokens, shared_config_from_hf
from darkhorse.interop.hf.tensor_maps import PaddedRows, TensorMap, dense_mlp_maps, expert_maps, moe_router_maps
from darkhorse.interop.safetensors_io import SafetensorsDir

MLA_NAMES = (
    "kv_a_proj_with_mqa.weight",
    "kv_a_layernorm.weight",
    "kv_b_proj.weight",
    "o_proj.weight",
)
MLA_QUERY_NAMES = {True: ("q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"), False: ("q_proj.weight",)}


class DeepseekV3Adapter(HFAdapter):
    """MLA attention, sigmoid-routed MoE with shared experts after `first_k_dense` dense layers, MTP.

    config.json carries `scoring_func` and `topk_method` explicitly: vLLM needs them to load the
    selection bias, and llama.cpp's converter gates with softmax without them."""

    architecture = "DeepseekV3ForCausalLM"
    model_type = "deepseek_v3"
    keep_fp32 = ("e_score_correction_bias",)
    exports_mtp = True

    def export_refusals(self, config: ModelConfig) -> list[str]:
        reasons = capabilities.failed(
            (config.attention != "mla", f"model.attention={config.attention} (DeepseekV3 uses MLA)")
        )
        if config.ffn == "moe":
            moe = config.moe
            reasons += capabilities.failed(
                (moe.scoring != "sigmoid", f"model.moe.scoring={moe.scoring} (DeepseekV3 uses sigmoid)")
            )
            reasons += capabilities.deepseek_moe_refusals(moe)
        return reasons

    def config_to_hf(self, config: ModelConfig, tokens: SpecialTokens, dtype: str) -> dict[str, Any]:
        """The Llama keys with MLA's head shapes, plus the MLA, MoE and MTP keys."""
        mla, moe = config.mla, config.moe
        hf = super().config_to_hf(config, tokens, dtype)
        del hf["mlp_bias"]
        n_group, topk_group = moe.limiting_groups()  # transformers needs groups of at least two experts
        hf.update(
            num_key_value_heads=config.n_heads,  # MLA: every head has its own keys and values
            head_dim=mla.qk_rope_head_dim,
            q_lora_rank=mla.q_lora_rank or None,
            kv_lora_rank=mla.kv_lora_rank,
            qk_nope_head_dim=mla.qk_nope_head_dim,
            qk_rope_head_dim=mla.qk_rope_head_dim,
            v_head_dim=mla.v_head_dim,
            rope_interleave=True,
            moe_intermediate_size=moe.moe_intermediate_size,
            n_routed_experts=moe.n_routed_experts,
            n_shared_experts=moe.n_shared_experts,
            num_experts_per_tok=moe.experts_per_token,
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=moe.routed_scaling_factor,
            norm_topk_prob=moe.norm_topk_prob,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            first_k_dense_replace=moe.first_k_dense if config.ffn == "moe" else config.n_layers,
            moe_layer_freq=1,
            num_nextn_predict_layers=config.mtp_depth,
        )
        return hf

    def config_from_hf(self, hf: dict[str, Any], where: str, source: SafetensorsDir) -> dict[str, Any]:
        if hf.get("attention_bias"):
            raise DarkhorseError(f"{where}: attention_bias=true is not supported for MLA by darkhorse")
        if not hf.get("rope_interleave", True):
            raise DarkhorseError(f"{where}: rope_interleave=false is not supported (darkhorse MLA is interleaved)")
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise DarkhorseError(f"{where}: scoring_func '{hf['scoring_func']}' is not supported (sigmoid only)")
        if int(hf.get("moe_layer_freq", 1)) != 1:
            raise DarkhorseError(f"{where}: moe_layer_freq != 1 is not supported")
        layers = int(hf["num_hidden_layers"])
        first_dense = min(int(hf.get("first_k_dense_replace", 0)), layers)
        # transformers itself drops MTP layers, so a config may declare them without their tensors.
        mtp_depth = int(hf.get("num_nextn_predict_layers") or 0)
        if f"model.layers.{layers}.eh_proj.weight" not in source:
            mtp_depth = 0
        return {
            **shared_config_from_hf(hf, where, default_context=4096),
            "n_kv_heads": int(hf["num_attention_heads"]),
            "attention": "mla",
            "ffn": "moe" if first_dense < layers else "dense",
            "mtp_depth": mtp_depth,
            "mla": {
                "q_lora_rank": int(hf.get("q_lora_rank") or 0),
                "kv_lora_rank": int(hf["kv_lora_rank"]),
                "qk_nope_head_dim": int(hf["qk_nope_head_dim"]),
                "qk_rope_head_dim": int(hf["qk_rope_head_dim"]),
                "v_head_dim": int(hf["v_head_dim"]),
            },
            "moe": {
                "n_routed_experts": int(hf["n_routed_experts"]),
                "n_shared_experts": int(hf.get("n_shared_experts") or 0),
                "experts_per_token": int(hf["num_experts_per_tok"]),
                "moe_intermediate_size": int(hf["moe_intermediate_size"]),
                "scoring": "sigmoid",
                "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
                "routed_scaling_factor": float(hf.get("routed_scaling_factor", 1.0)),
                "first_k_dense": first_dense,
                "n_groups": int(hf.get("n_group") or 1),
                "topk_groups": int(hf.get("topk_group") or 1),
            },
        }

    def attention_maps(self, config: ModelConfig, ours: str, theirs: str) -> list[TensorMap]:
        names = MLA_QUERY_NAMES[config.mla.q_lora_rank > 0] + MLA_NAMES
        return [TensorMap(ours + name, (theirs + name,)) for name in names]

    def ffn_maps(self, config: ModelConfig, layer: int, ours: str, theirs: str) -> list[TensorMap]:
        if config.ffn != "moe" or layer < config.moe.first_k_dense:
            return dense_mlp_maps(ours, theirs + "mlp.")
        names = {p: f"{theirs}mlp.experts.{{j}}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
        return [
            *moe_router_maps(config, layer, ours, theirs + "mlp.gate"),
            *expert_maps(config, ours, names, theirs + "mlp.experts."),
            *dense_mlp_maps(ours + "shared_experts.", theirs + "mlp.shared_experts."),
        ]

    def tensor_maps(self, config: ModelConfig) -> list[TensorMap]:
        """The Llama-style maps plus MTP modules as the extra layers `num_nextn_predict_layers` declares.

        Each MTP layer also carries copies of the embedding and the head (vLLM loads them from there)."""
        maps = super().tensor_maps(config)
        embed_copies: tuple[str, ...] = ()
        head_copies: tuple[str, ...] = ()
        for k in range(config.mtp_depth):
            ours, theirs = f"mtp.{k}.", f"model.layers.{config.n_layers + k}."
            embed_copies += (theirs + "embed_tokens.weight",)
            head_copies += (theirs + "shared_head.head.weight",)
            maps += [
                TensorMap(ours + "enorm.weight", (theirs + "enorm.weight",)),
                TensorMap(ours + "hnorm.weight", (theirs + "hnorm.weight",)),
                TensorMap(ours + "eh_proj.weight", (theirs + "eh_proj.weight",)),
                TensorMap(ours + "norm.weight", (theirs + "shared_head.norm.weight",)),
                *self.layer_maps(config, config.n_layers + k, ours + "block.", theirs),
            ]
        if config.tie_embeddings:
            embed_copies += head_copies
        else:
            head_index = next(i for i, m in enumerate(maps) if m.ours == "lm_head.weight")
            maps[head_index] = PaddedRows("lm_head.weight", maps[head_index].hf + head_copies)
        maps[0] = PaddedRows("embed.weight", maps[0].hf + embed_copies)
        return maps
