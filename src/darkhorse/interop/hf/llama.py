"""Llama and Mistral: the base layout itself, and Llama with an optional sliding window."""

from __future__ import annotations

from typing import Any

from darkhorse.interop.hf.base import HFAdapter
from darkhorse.interop.safetensors_io import SafetensorsDir


class LlamaAdapter(HFAdapter):
    """The base layout as it is."""


class MistralAdapter(HFAdapter):
    """Llama plus an optional sliding window: imported with the context capped at the window.

    Within the window sliding-window attention is plain causal attention, so capping
    `max_seq_len` at the window keeps the model exact without a windowed attention kernel."""

    architecture = "MistralForCausalLM"
    model_type = "mistral"

    def config_from_hf(self, hf: dict[str, Any], where: str, source: SafetensorsDir) -> dict[str, Any]:
        model = super().config_from_hf(hf, where, source)
        window = hf.get("sliding_window")
        if window and hf.get("use_sliding_window", True) and int(window) < model["max_seq_len"]:
            model["max_seq_len"] = int(window)
        return model
