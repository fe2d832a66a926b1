"""The adapter base: the Llama layout every supported HF architecture shares, and config translation.

One small adapter per outside architecture, in the spirit of torchtitan's state-dict adapters, maps
the config both ways (`config_to_hf`, `config_from_hf`) and lists, for one config, every darkhorse
tensor together with the HF tensor(s) that hold the same numbers (`tensor_maps`). Export and import
walk the same list in opposite directions, one tensor at a time, so neither needs two copies of a model.

    darkhorse (docs/design.md)                 HF (LlamaForCausalLM and relatives)
    embed.weight                               model.embed_tokens.weight
    layers.{i}.attn_norm.weight                model.layers.{i}.input_layernorm.weight
    layers.{i}.attn.{q,k,v,o}_proj.weight      model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.attn.{q,k,v}_proj.bias          ... (Qwen2: `model.attention_bias`)
    layers.{i}.attn.{q,k}_norm.weight          ... (Qwen3: `model.qk_norm`)
    layers.{i}.ffn_norm.weight                 model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.ffn.{gate,up,down}_proj.weight  model.layers.{i}.mlp.{gate,up,down}_proj.weight
    norm.weight                                model.norm.weight
    lm_head.weight                             lm_head.weight (absent when tied)

Our GQA RoPE is HF's half-split (rotate_half) layout and our MLA keeps DeepSeek's interleaved rope rows
(see model/attention.py), so no weight is permuted on the way. The vocabulary is padded to a multiple
of 64: an export declares the padded size; an import pads a smaller HF vocabulary with zero rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from darkhorse.config import ModelConfig
from darkhorse.errors import DarkhorseError
from darkhorse.interop.capabilities import failed
from darkhorse.interop.hf.tensor_maps import PaddedRows, TensorMap, dense_mlp_maps
from darkhorse.interop.safetensors_io import SafetensorsDir

# ---------------------------------------------------------------------------------------------
# Config helpers shared by the adapters

_INT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "first_k_dense_replace", "kv_lora_rank",
    "moe_intermediate_size", "moe_layer_freq", "n_group", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "num_local_experts", "num_nextn_predict_layers", "q_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "sliding_window", "topk_group",
)  # fmt: skip
# The JSON type of every config.json field an adapter reads: a wrong one is refused naming file and field.
HF_CONFIG_TYPES: dict[str, type] = {
    **dict.fromkeys(_INT_KEYS, int),
    **dict.fromkeys(("rms_norm_eps", "rope_theta", "initializer_range", "routed_scaling_factor"), float),
    **dict.fromkeys(("attention_bias", "mlp_bias", "rope_interleave", "norm_topk_prob", "use_sliding_window"), bool),
    "tie_word_embeddings": bool,
    **dict.fromkeys(("hidden_act", "scoring_func", "model_type"), str),
    **dict.fromkeys(("rope_parameters", "rope_scaling"), dict),
    "architectures": list,
}
HF_ROPE_TYPES: dict[str, type] = {
    **dict.fromkeys(("rope_type", "type"), str),
    "original_max_position_embeddings": int,
    **dict.fromkeys(
        ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale"), float
    ),
    "mscale_all_dim": float,
}


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(theta, scaling dict) from transformers 5 `rope_parameters` or v4 `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = params or legacy
    scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    scaling.pop("type", None)
    return theta, scaling


def rope_scaling_from_hf(scaling: dict[str, Any], max_seq_len: int, where: str) -> dict[str, Any]:
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return {"type": "none"}
    factor = float(scaling.get("factor", 1.0))
    if kind == "llama3":
        return {
            "type": "llama3",
            "factor": factor,
            "original_max_seq_len": int(scaling["original_max_position_embeddings"]),
            "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
        }
    if kind != "yarn":
        raise DarkhorseError(
            f"{where}: rope type '{kind}' is not supported by darkhorse (supported: default, yarn, llama3)"
        )
    return {
        "type": "yarn",
        "factor": factor,
        "original_max_seq_len": int(scaling.get("original_max_position_embeddings") or max_seq_len / factor),
        "beta_fast": float(scaling.get("beta_fast") or 32.0),
        "beta_slow": float(scaling.get("beta_slow") or 1.0),
        "mscale": float(scaling.get("mscale") or 1.0),
        "mscale_all_dim": float(scaling.get("mscale_all_dim") or 0.0),
    }


def rope_scaling_to_hf(config: ModelConfig) -> dict[str, Any] | None:
    scaling = config.rope_scaling
    if scaling.type == "none":
        return None
    if scaling.type == "llama3":
        return {
            "rope_type": "llama3",
            "factor": scaling.factor,
            "original_max_position_embeddings": scaling.original_max_seq_len,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
        }
    return {
        "rope_type": "yarn",
        "type": "yarn",
        "factor": scaling.factor,
        "original_max_position_embeddings": scaling.original_max_seq_len,
        "beta_fast": scaling.beta_fast,
        "beta_slow": scaling.beta_slow,
        "mscale": scaling.mscale,
        "mscale_all_dim": scaling.mscale_all_dim,
    }


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids that config.json and generation_config.json declare."""

    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None


# ---------------------------------------------------------------------------------------------
# Adapters


def shared_config_from_hf(hf: dict[str, Any], where: str, *, default_context: int) -> dict[str, Any]:
    """The `model:` keys every HF decoder config spells the same way (sizes, context, RoPE, norm, init)."""
    max_seq_len = int(hf.get("max_position_embeddings", default_context))
    theta, scaling = rope_from_hf(hf)
    return {
        "vocab_size": int(hf["vocab_size"]),
        "n_layers": int(hf["num_hidden_layers"]),
        "dim": int(hf["hidden_size"]),
        "n_heads": int(hf["num_attention_heads"]),
        "ffn_dim": int(hf["intermediate_size"]),
        "max_seq_len": max_seq_len,
        "rope_theta": theta,
        "rope_scaling": rope_scaling_from_hf(scaling, max_seq_len, where),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
    }


class HFAdapter:
    """Base: the Llama layout that every supported architecture shares (embeddings, norms, GQA)."""

    architecture: ClassVar[str] = "LlamaForCausalLM"
    model_type: ClassVar[str] = "llama"
    keep_fp32: ClassVar[tuple[str, ...]] = ()  # HF tensor-name suffixes that stay fp32 in any dtype

    # -- export side ----------------------------------------------------------------------------

    def export_refusals(self, config: ModelConfig) -> list[str]:
        """Why this architecture cannot hold `config` (empty when it can); mHC is refused before any adapter."""
        return failed(
            (config.attention != "gqa", f"model.attention={config.attention}"),
            (config.ffn != "dense", f"model.ffn={config.ffn}"),
            (config.attention_bias, "model.attention_bias (q/k/v biases)"),
            (config.qk_norm, "model.qk_norm"),
        )

    def config_to_hf(self, config: ModelConfig, tokens: SpecialTokens, dtype: str) -> dict[str, Any]:
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": config.padded_vocab_size,
            "hidden_size": config.dim,
            "intermediate_size": config.ffn_dim,
            "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.n_kv_heads,
            "head_dim": config.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": config.max_seq_len,
            "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta,
            "rope_scaling": rope_scaling_to_hf(config),
            "tie_word_embeddings": config.tie_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": config.init_std,
            "bos_token_id": tokens.bos_id,
            "eos_token_id": tokens.eos_id,
            "pad_token_id": tokens.pad_id,
            "torch_dtype": dtype,
            "use_cache": True,
        }
        return hf

    # -- import side ----------------------------------------------------------------------------

    def config_from_hf(self, hf: dict[str, Any], where: str, source: SafetensorsDir) -> dict[str, Any]:
        """A `model:` config dict (validated later by ModelConfig) for the HF config `hf` of `source`."""
        dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        if hf.get("hidden_act", "silu") != "silu":
            raise DarkhorseError(f"{where}: hidden_act '{hf['hidden_act']}' is not supported (darkhorse: silu)")
        if hf.get("mlp_bias"):
            raise DarkhorseError(f"{where}: mlp_bias=true is not supported by darkhorse")
        return {
            **shared_config_from_hf(hf, where, default_context=2048),
            "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
            "head_dim": int(hf.get("head_dim") or dim // heads),  # Qwen3: head_dim x heads may differ from dim
            "attention": "gqa",
            "ffn": "dense",
            "attention_bias": self._attention_bias(hf, where),
            "qk_norm": False,
        }

    def _attention_bias(self, hf: dict[str, Any], where: str) -> bool:
        if hf.get("attention_bias"):
            raise DarkhorseError(
                f"{where}: attention_bias=true puts a bias on o_proj too, which darkhorse does not have"
            )
        return False

    # -- tensors --------------------------------------------------------------------------------

    exports_mtp: ClassVar[bool] = False  # else MTP modules (training-only) are left out of exports

    def tensor_maps(self, config: ModelConfig) -> list[TensorMap]:
        maps: list[TensorMap] = [PaddedRows("embed.weight", ("model.embed_tokens.weight",))]
        for i in range(config.n_layers):
            maps += self.layer_maps(config, i, f"layers.{i}.", f"model.layers.{i}.")
        maps.append(TensorMap("norm.weight", ("model.norm.weight",)))
        if not config.tie_embeddings:
            maps.append(PaddedRows("lm_head.weight", ("lm_head.weight",)))
        return maps

    def layer_maps(self, config: ModelConfig, layer: int, ours: str, theirs: str) -> list[TensorMap]:
        """One decoder block (`layer` decides dense vs MoE FFN, as in the model)."""
        return [
            TensorMap(ours + "attn_norm.weight", (theirs + "input_layernorm.weight",)),
            TensorMap(ours + "ffn_norm.weight", (theirs + "post_attention_layernorm.weight",)),
            *self.attention_maps(config, ours + "attn.", theirs + "self_attn."),
            *self.ffn_maps(config, layer, ours + "ffn.", theirs),
        ]

    def attention_maps(self, config: ModelConfig, ours: str, theirs: str) -> list[TensorMap]:
        names = [f"{p}_proj.weight" for p in "qkvo"]
        if config.attention_bias:
            names += [f"{p}_proj.bias" for p in "qkv"]
        if config.qk_norm:
            names += ["q_norm.weight", "k_norm.weight"]
        return [TensorMap(ours + name, (theirs + name,)) for name in names]

    def ffn_maps(self, config: ModelConfig, layer: int, ours: str, theirs: str) -> list[TensorMap]:
        return dense_mlp_maps(ours, theirs + "mlp.")

    def ignored_on_import(self, name: str, config: dict[str, Any]) -> bool:
        """HF tensors with no darkhorse counterpart that carry no information (e.g. cached RoPE tables)."""
        return name.endswith("rotary_emb.inv_freq")
