"""Qwen2 and Qwen3: Llama plus q/k/v biases or q/k norms."""

from __future__ import annotations

from typing import Any

from darkhorse.config import ModelConfig
from darkhorse.interop.capabilities import failed
from darkhorse.interop.hf.base import SpecialTokens
from darkhorse.interop.hf.llama import MistralAdapter
from darkhorse.interop.safetensors_io import SafetensorsDir


class QwenAdapter(MistralAdapter):
    """Qwen2/Qwen3: Llama plus one attention feature the architecture always has (`required_flag`),
    exported without a sliding window."""

    required_flag = ""  # the ModelConfig flag the architecture always sets
    required_reason = ""
    dropped_hf_keys: tuple[str, ...] = ()  # Llama config keys the architecture does not know

    def export_refusals(self, config: ModelConfig) -> list[str]:
        flag = f"model.{self.required_flag}"
        reasons = [r for r in super().export_refusals(config) if not r.startswith(flag)]
        return reasons + failed((not getattr(config, self.required_flag), f"{flag}=false ({self.required_reason})"))

    def config_to_hf(self, config: ModelConfig, tokens: SpecialTokens, dtype: str) -> dict[str, Any]:
        hf = super().config_to_hf(config, tokens, dtype)
        for key in self.dropped_hf_keys:
            del hf[key]
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layers)
        return hf


class Qwen2Adapter(QwenAdapter):
    """Llama with q/k/v biases (always present in Qwen2)."""

    architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"
    required_flag = "attention_bias"
    required_reason = "Qwen2 always has q/k/v biases"
    dropped_hf_keys = ("attention_bias", "mlp_bias")

    def config_to_hf(self, config: ModelConfig, tokens: SpecialTokens, dtype: str) -> dict[str, Any]:
        hf = super().config_to_hf(config, tokens, dtype)
        if config.head_dim * config.n_heads == config.dim:  # Qwen2's configs leave the default out
            del hf["head_dim"]
        return hf

    def _attention_bias(self, hf: dict[str, Any], where: str) -> bool:
        return True


class Qwen3Adapter(QwenAdapter):
    """Llama with RMSNorm on each query and key head before RoPE."""

    architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"
    required_flag = "qk_norm"
    required_reason = "Qwen3 always normalises q and k"
    dropped_hf_keys = ("mlp_bias",)

    def config_from_hf(self, hf: dict[str, Any], where: str, source: SafetensorsDir) -> dict[str, Any]:
        return {**super().config_from_hf(hf, where, source), "qk_norm": True}
