"""Hugging Face transformers architectures: one state-dict adapter per family, and the choice among them.

`base.HFAdapter` is the Llama layout the families share (base.py's docstring maps the tensor names)
and `tensor_maps` the per-tensor correspondences; llama, qwen, mixtral and deepseek_v3 hold the
families. Export picks the first architecture that represents a config exactly; import picks by
config.json's `architectures`.
"""

from __future__ import annotations

from typing import Any

from darkhorse.config import ModelConfig
from darkhorse.errors import DarkhorseError
from darkhorse.interop import capabilities
from darkhorse.interop.hf.base import HFAdapter
from darkhorse.interop.hf.deepseek_v3 import DeepseekV3Adapter
from darkhorse.interop.hf.llama import LlamaAdapter, MistralAdapter
from darkhorse.interop.hf.mixtral import MixtralAdapter
from darkhorse.interop.hf.qwen import Qwen2Adapter, Qwen3Adapter

IMPORT_ADAPTERS: dict[str, type[HFAdapter]] = {
    cls.architecture: cls
    for cls in (LlamaAdapter, MistralAdapter, MixtralAdapter, Qwen2Adapter, Qwen3Adapter, DeepseekV3Adapter)
}
# Export picks the first architecture that represents the config exactly.
EXPORT_ADAPTERS: tuple[type[HFAdapter], ...] = (
    LlamaAdapter, Qwen2Adapter, Qwen3Adapter, MixtralAdapter, DeepseekV3Adapter,
)  # fmt: skip


def adapter_for_import(hf_config: dict[str, Any], where: str) -> HFAdapter:
    architectures = hf_config.get("architectures") or []
    for name in architectures:
        if name in IMPORT_ADAPTERS:
            return IMPORT_ADAPTERS[name]()
    found = ", ".join(architectures) or f"none (model_type {hf_config.get('model_type')!r})"
    raise DarkhorseError(f"{where}: architecture {found} is not supported; supported: {', '.join(IMPORT_ADAPTERS)}")


def adapter_for_export(config: ModelConfig) -> HFAdapter:
    """The HF architecture that holds `config` exactly, or an error naming what stands in the way."""
    if reasons := capabilities.architecture_refusals(config):
        raise capabilities.refusal("Hugging Face", reasons)
    for cls in EXPORT_ADAPTERS:
        if not cls().export_refusals(config):
            return cls()
    closest = (
        DeepseekV3Adapter if config.attention == "mla" else MixtralAdapter if config.ffn == "moe" else LlamaAdapter
    )()
    raise capabilities.refusal(f"Hugging Face as {closest.architecture}", closest.export_refusals(config))
