"""State-dict adapters between darkhorse and Hugging Face transformers architectures.

One small adapter per outside architecture, in the spirit of torchtitan's state-dict adapters: it maps
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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open

from darkhorse.config import ModelConfig
from darkhorse.errors import DarkhorseError

Tensor = torch.Tensor
INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# Reading safetensors lazily (HF directories and darkhorse checkpoints alike)


def _open_unmapped(path: Path):
    """A safetensors handle that reads with pread: with mmap every page read stays mapped into the
    process until the handle closes, so a conversion's RSS would hold the source file besides the model."""
    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.8 has only mmap
        return safe_open(str(path), framework="pt")


class SafetensorsDir:
    """The tensors of a directory (one `.safetensors` file, or shards with an index), read on demand."""

    def __init__(self, path: str | Path, single_file: str = "model.safetensors") -> None:
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DarkhorseError(f"{index}: not a safetensors index (no 'weight_map')") from None
            files = sorted(set(weight_map.values()))
        elif (self.path / single_file).exists():
            files = [single_file]
        else:
            found = ", ".join(sorted(p.name for p in self.path.glob("*.bin"))) or "none"
            raise DarkhorseError(
                f"{self.path}: no {single_file} or {INDEX_FILE} (other weight files: {found}); "
                "only safetensors weights are read (re-save with save_pretrained(safe_serialization=True))"
            )
        self._handles = {}
        self._file_of: dict[str, str] = {}
        for file in files:
            if not (self.path / file).exists():
                raise DarkhorseError(f"{self.path / file}: listed in {INDEX_FILE} but missing")
            handle = _open_unmapped(self.path / file)
            self._handles[file] = handle
            self._file_of.update(dict.fromkeys(handle.keys(), file))

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        return self._handles[self._file_of[name]].get_tensor(name)


# ---------------------------------------------------------------------------------------------
# Tensor maps: one darkhorse tensor <-> the HF tensor(s) holding it


@dataclass(frozen=True)
class TensorMap:
    """Our tensor `ours` is HF's `hf[0]`, unchanged.

    Further `hf` names are copies that exports write too (DeepSeek's MTP layer repeats the embedding
    and head); `alt` lists other names under which other transformers versions store `hf[0]`.
    """

    ours: str
    hf: tuple[str, ...]
    alt: tuple[str, ...] = ()

    def to_hf(self, tensor: Tensor) -> list[tuple[str, Tensor]]:
        return [(name, tensor) for name in self.hf]

    def _stored_as(self, source: SafetensorsDir) -> str | None:
        return next((name for name in (self.hf[0], *self.alt) if name in source), None)

    def from_hf(self, source: SafetensorsDir, like: Tensor) -> Tensor:
        """Our tensor (shaped like `like`) read from `source`."""
        return source.get(self._stored_as(source))

    def missing(self, source: SafetensorsDir) -> list[str]:
        """HF names this map needs that `source` lacks."""
        return [] if self._stored_as(source) else [self.hf[0]]

    def known(self) -> tuple[str, ...]:
        """Every HF name this map accounts for (read, copies and alternatives)."""
        return self.hf + self.alt


@dataclass(frozen=True)
class PaddedRows(TensorMap):
    """Embedding / head rows: an HF vocabulary may be smaller than ours (padded to a multiple of 64)."""

    def from_hf(self, source: SafetensorsDir, like: Tensor) -> Tensor:
        tensor = super().from_hf(source, like)
        rows = like.shape[0] - tensor.shape[0]
        return torch.cat([tensor, tensor.new_zeros(rows, *tensor.shape[1:])]) if rows > 0 else tensor


@dataclass(frozen=True)
class PerExpert(TensorMap):
    """Our (experts, out, in) tensor is one HF matrix per expert (`...experts.{j}....weight`).

    transformers 5 may also save the fused layout (`mlp.experts.gate_up_proj` [E, 2I, H] with gate
    rows first, `mlp.experts.down_proj` [E, H, I]); `fused` names that tensor and `rows` the slice of
    its dim 1 that belongs to us, so imports read either layout. Exports always write per-expert
    keys, the only layout vLLM and llama.cpp's converter read.
    """

    fused: str = ""
    rows: tuple[int, int] | None = None

    def to_hf(self, tensor: Tensor) -> list[tuple[str, Tensor]]:
        return list(zip(self.hf, tensor.unbind(0), strict=True))

    def _use_fused(self, source: SafetensorsDir) -> bool:
        return bool(self.fused) and self.fused in source and any(name not in source for name in self.hf)

    def from_hf(self, source: SafetensorsDir, like: Tensor) -> Tensor:
        if self._use_fused(source):
            fused = source.get(self.fused)
            return fused if self.rows is None else fused[:, self.rows[0] : self.rows[1]].contiguous()
        return torch.stack([source.get(name) for name in self.hf])

    def missing(self, source: SafetensorsDir) -> list[str]:
        return [] if self._use_fused(source) else [name for name in self.hf if name not in source]

    def known(self) -> tuple[str, ...]:
        return self.hf + ((self.fused,) if self.fused else ())


@dataclass(frozen=True)
class OursOnly(TensorMap):
    """A darkhorse tensor with no HF counterpart: imports fill it with `fill`; exports drop it.

    With `refusal` set, exporting refuses when the tensor is not all `fill` (the target cannot
    represent what it holds) and says why."""

    fill: float = 0.0
    refusal: str = ""

    def to_hf(self, tensor: Tensor) -> list[tuple[str, Tensor]]:
        if self.refusal and not bool((tensor == self.fill).all()):
            raise DarkhorseError(f"{self.ours} is not all {self.fill:g}: {self.refusal}")
        return []

    def from_hf(self, source: SafetensorsDir, like: Tensor) -> Tensor:
        return torch.full(like.shape, self.fill, dtype=like.dtype)

    def missing(self, source: SafetensorsDir) -> list[str]:
        return []


# ---------------------------------------------------------------------------------------------
# Config helpers shared by the adapters


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


def _refuse(condition: bool, reasons: list[str], reason: str) -> None:
    if condition:
        reasons.append(reason)


# ---------------------------------------------------------------------------------------------
# Adapters


class HFAdapter:
    """Base: the Llama layout that every supported architecture shares (embeddings, norms, GQA)."""

    architecture: ClassVar[str] = "LlamaForCausalLM"
    model_type: ClassVar[str] = "llama"
    keep_fp32: ClassVar[tuple[str, ...]] = ()  # HF tensor-name suffixes that stay fp32 in any dtype

    # -- export side ----------------------------------------------------------------------------

    def export_refusals(self, config: ModelConfig) -> list[str]:
        """Why this architecture cannot hold `config` (empty when it can)."""
        reasons: list[str] = []
        _refuse(config.residual != "plain", reasons, f"model.residual={config.residual} (mHC residual streams)")
        _refuse(config.attention != "gqa", reasons, f"model.attention={config.attention}")
        _refuse(config.ffn != "dense", reasons, f"model.ffn={config.ffn}")
        _refuse(config.attention_bias, reasons, "model.attention_bias (q/k/v biases)")
        _refuse(config.qk_norm, reasons, "model.qk_norm")
        return reasons

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
        max_seq_len = int(hf.get("max_position_embeddings", 2048))
        theta, scaling = rope_from_hf(hf)
        return {
            "vocab_size": int(hf["vocab_size"]),
            "n_layers": int(hf["num_hidden_layers"]),
            "dim": dim,
            "n_heads": heads,
            "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
            "head_dim": int(hf.get("head_dim") or dim // heads),  # Qwen3: head_dim x heads may differ from dim
            "ffn_dim": int(hf["intermediate_size"]),
            "max_seq_len": max_seq_len,
            "rope_theta": theta,
            "rope_scaling": rope_scaling_from_hf(scaling, max_seq_len, where),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "init_std": float(hf.get("initializer_range", 0.02)),
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


def dense_mlp_maps(ours: str, theirs: str) -> list[TensorMap]:
    return [TensorMap(f"{ours}{p}_proj.weight", (f"{theirs}{p}_proj.weight",)) for p in ("gate", "up", "down")]


class LlamaAdapter(HFAdapter):
    pass


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


class QwenAdapter(MistralAdapter):
    """Qwen2/Qwen3: Llama plus one attention feature the architecture always has (`required_flag`),
    exported without a sliding window."""

    required_flag = ""  # the ModelConfig flag the architecture always sets
    required_reason = ""
    dropped_hf_keys: tuple[str, ...] = ()  # Llama config keys the architecture does not know

    def export_refusals(self, config: ModelConfig) -> list[str]:
        flag = f"model.{self.required_flag}"
        reasons = [r for r in super().export_refusals(config) if not r.startswith(flag)]
        _refuse(not getattr(config, self.required_flag), reasons, f"{flag}=false ({self.required_reason})")
        return reasons

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


def moe_router_maps(config: ModelConfig, ours: str, router: str, bias_refusal: str = "") -> list[TensorMap]:
    """Router weight, ALF selection bias and (training-only) domain-prior state of one MoE layer."""
    maps: list[TensorMap] = [TensorMap(ours + "gate.weight", (router + ".weight",))]
    if bias_refusal:
        maps.append(OursOnly(ours + "gate.e_score_correction_bias", (), refusal=bias_refusal))
    else:
        maps.append(TensorMap(ours + "gate.e_score_correction_bias", (router + ".e_score_correction_bias",)))
    if config.moe.domain_prior:
        maps.append(OursOnly(ours + "domain_prior_scale", (), fill=1.0))
    return maps


def expert_maps(config: ModelConfig, ours: str, names: dict[str, str], fused_prefix: str) -> list[TensorMap]:
    """Our stacked expert weights <-> per-expert HF names (`names[proj]` has a `{j}` field)."""
    size = config.moe.moe_intermediate_size
    experts = range(config.moe.n_routed_experts)
    fused = {
        "gate_proj": (fused_prefix + "gate_up_proj", (0, size)),
        "up_proj": (fused_prefix + "gate_up_proj", (size, 2 * size)),
        "down_proj": (fused_prefix + "down_proj", None),
    }
    return [
        PerExpert(
            ours + "experts." + proj,
            tuple(names[proj].format(j=j) for j in experts),
            fused=fused[proj][0],
            rows=fused[proj][1],
        )
        for proj in ("gate_proj", "up_proj", "down_proj")
    ]


class MixtralAdapter(MistralAdapter):
    """Softmax-routed MoE in every layer, GQA attention, no shared experts."""

    architecture = "MixtralForCausalLM"
    model_type = "mixtral"

    def export_refusals(self, config: ModelConfig) -> list[str]:
        reasons = [r for r in super().export_refusals(config) if not r.startswith("model.ffn=")]
        _refuse(config.ffn != "moe", reasons, "model.ffn=dense (no experts)")
        moe = config.moe
        _refuse(moe.scoring != "softmax", reasons, f"model.moe.scoring={moe.scoring} (Mixtral routes by softmax)")
        _refuse(moe.n_shared_experts > 0, reasons, "model.moe.n_shared_experts > 0 (Mixtral has no shared experts)")
        _refuse(moe.first_k_dense > 0, reasons, "model.moe.first_k_dense > 0 (every Mixtral layer is MoE)")
        _refuse(not moe.norm_topk_prob, reasons, "model.moe.norm_topk_prob=false (Mixtral renormalises the top-k)")
        _refuse(moe.routed_scaling_factor != 1.0, reasons, "model.moe.routed_scaling_factor != 1")
        _refuse(moe.n_groups > 1, reasons, "model.moe.n_groups > 1 (group-limited routing)")
        _refuse(moe.capacity_factor > 0, reasons, "model.moe.capacity_factor > 0 (dropped tokens)")
        return reasons

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
            ours,
            theirs + "block_sparse_moe.gate",
            bias_refusal="Mixtral selects experts by router score alone, so a nonzero selection bias "
            "cannot be exported (fine-tune with model.moe.bias_update_rate=0)",
        )
        router[0] = TensorMap(router[0].ours, router[0].hf, alt=(theirs + "mlp.gate.weight",))
        return router + expert_maps(config, ours, names, theirs + "mlp.experts.")


MIXTRAL_EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
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
        reasons: list[str] = []
        _refuse(config.residual != "plain", reasons, f"model.residual={config.residual} (mHC residual streams)")
        _refuse(config.attention != "mla", reasons, f"model.attention={config.attention} (DeepseekV3 uses MLA)")
        if config.ffn == "moe":
            moe = config.moe
            _refuse(moe.scoring != "sigmoid", reasons, f"model.moe.scoring={moe.scoring} (DeepseekV3 uses sigmoid)")
            _refuse(moe.n_shared_experts < 1, reasons, "model.moe.n_shared_experts=0 (DeepseekV3 has shared experts)")
            _refuse(moe.capacity_factor > 0, reasons, "model.moe.capacity_factor > 0 (dropped tokens)")
        return reasons

    def config_to_hf(self, config: ModelConfig, tokens: SpecialTokens, dtype: str) -> dict[str, Any]:
        mla, moe = config.mla, config.moe
        dense_layers = moe.first_k_dense if config.ffn == "moe" else config.n_layers
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": config.padded_vocab_size,
            "hidden_size": config.dim,
            "intermediate_size": config.ffn_dim,
            "moe_intermediate_size": moe.moe_intermediate_size,
            "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads,
            "num_key_value_heads": config.n_heads,
            "q_lora_rank": mla.q_lora_rank or None,
            "kv_lora_rank": mla.kv_lora_rank,
            "qk_nope_head_dim": mla.qk_nope_head_dim,
            "qk_rope_head_dim": mla.qk_rope_head_dim,
            "v_head_dim": mla.v_head_dim,
            "head_dim": mla.qk_rope_head_dim,
            "n_routed_experts": moe.n_routed_experts,
            "n_shared_experts": moe.n_shared_experts,
            "num_experts_per_tok": moe.experts_per_token,
            "n_group": moe.n_groups,
            "topk_group": moe.topk_groups,
            "routed_scaling_factor": moe.routed_scaling_factor,
            "norm_topk_prob": moe.norm_topk_prob,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "first_k_dense_replace": dense_layers,
            "moe_layer_freq": 1,
            "num_nextn_predict_layers": config.mtp_depth,
            "hidden_act": "silu",
            "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta,
            "rope_scaling": rope_scaling_to_hf(config),
            "rope_interleave": True,
            "max_position_embeddings": config.max_seq_len,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": config.tie_embeddings,
            "initializer_range": config.init_std,
            "bos_token_id": tokens.bos_id,
            "eos_token_id": tokens.eos_id,
            "pad_token_id": tokens.pad_id,
            "torch_dtype": dtype,
            "use_cache": True,
        }

    def config_from_hf(self, hf: dict[str, Any], where: str, source: SafetensorsDir) -> dict[str, Any]:
        if hf.get("attention_bias"):
            raise DarkhorseError(f"{where}: attention_bias=true is not supported for MLA by darkhorse")
        if not hf.get("rope_interleave", True):
            raise DarkhorseError(f"{where}: rope_interleave=false is not supported (darkhorse MLA is interleaved)")
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise DarkhorseError(f"{where}: scoring_func '{hf['scoring_func']}' is not supported (sigmoid only)")
        if int(hf.get("moe_layer_freq", 1)) != 1:
            raise DarkhorseError(f"{where}: moe_layer_freq != 1 is not supported")
        max_seq_len = int(hf.get("max_position_embeddings", 4096))
        theta, scaling = rope_from_hf(hf)
        layers = int(hf["num_hidden_layers"])
        first_dense = min(int(hf.get("first_k_dense_replace", 0)), layers)
        # transformers itself drops MTP layers, so a config may declare them without their tensors.
        mtp_depth = int(hf.get("num_nextn_predict_layers") or 0)
        if f"model.layers.{layers}.eh_proj.weight" not in source:
            mtp_depth = 0
        return {
            "vocab_size": int(hf["vocab_size"]),
            "n_layers": layers,
            "dim": int(hf["hidden_size"]),
            "n_heads": int(hf["num_attention_heads"]),
            "n_kv_heads": int(hf["num_attention_heads"]),
            "ffn_dim": int(hf["intermediate_size"]),
            "max_seq_len": max_seq_len,
            "rope_theta": theta,
            "rope_scaling": rope_scaling_from_hf(scaling, max_seq_len, where),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "init_std": float(hf.get("initializer_range", 0.02)),
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
            *moe_router_maps(config, ours, theirs + "mlp.gate"),
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


# ---------------------------------------------------------------------------------------------
# Choosing an adapter

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
    if config.residual == "mhc":
        raise DarkhorseError(
            "cannot export to Hugging Face: model.residual=mhc (manifold-constrained hyper-connections) has "
            "no transformers architecture; use --format safetensors or pt"
        )
    for cls in EXPORT_ADAPTERS:
        if not cls().export_refusals(config):
            return cls()
    closest = (
        DeepseekV3Adapter if config.attention == "mla" else MixtralAdapter if config.ffn == "moe" else LlamaAdapter
    )()
    reasons = "; ".join(closest.export_refusals(config))
    raise DarkhorseError(f"cannot export to Hugging Face as {closest.architecture}: {reasons}")
