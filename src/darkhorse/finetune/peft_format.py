"""darkhorse LoRA adapters in Hugging Face PEFT's on-disk layout (what `PeftModel.from_pretrained` loads).

Files of an adapter directory:
    adapter_config.json         a PEFT LoraConfig (peft_type LORA): r, lora_alpha, target_modules and
                                target_parameters as full transformers-5 module/parameter paths,
                                rank_pattern / alpha_pattern for the groups whose rank differs from r
    adapter_model.safetensors   fp32 tensors keyed `base_model.model.<transformers path>...` (below)
    darkhorse_adapter.json      our sidecar (`read_sidecar`): format darkhorse-lora-v1, the base (path,
                                kind, hf_dir, `checkpoint.weights_fingerprint` of its weights as loaded,
                                before any bf16 cast), the darkhorse config, router options, base dtype,
                                step, the LoRA settings and each PEFT key's darkhorse module. `darkhorse
                                merge` and `load_adapted_model` find the base through it (`check_base`).

Keys, with `P = base_model.model.model.layers.{i}` and names as transformers 5 holds the model in memory
(our export's per-tensor map, `interop.hf.adapter_for_export`, with Mixtral's `block_sparse_moe`
renamed to `mlp` as transformers 5 does on load):

    attention / dense MLP / shared   P.self_attn.q_proj.lora_A.weight [r, in], .lora_B.weight [out, r]
    (nn.Linear, target_modules)      (B @ A * alpha / r is added to the weight)
    router (target_parameters        P.mlp.gate.lora_A.weight [r, D], P.mlp.gate.lora_B.weight [E, r]
    "...mlp.gate.weight")
    routed experts (target_parameters "...mlp.experts.gate_up_proj" and "...mlp.experts.down_proj";
    PEFT's ParamWrapper; both wrap the same module, so gate_up_proj, declared first, is the inner one):
        P.mlp.experts.base_layer.lora_A.weight [E*2r, D]   rows e*2r + k (expert-major)
        P.mlp.experts.base_layer.lora_B.weight [2I, 2r*E]  columns k*E + e (expert index fastest)
        P.mlp.experts.lora_A.weight [E*r, I], P.mlp.experts.lora_B.weight [D, r*E] (down_proj)
      transformers 5 fuses gate and up into gate_up_proj [E, 2I, D] (gate rows first); our separate
      gate and up LoRAs become one of rank 2r: A = [A_gate; A_up], B = diag(B_gate, B_up), with
      alpha doubled so alpha / r is unchanged (what PEFT's own v4 -> v5 conversion does).
    router of a model whose auxiliary-loss-free bias keeps updating (DeepSeek-style): PEFT has no LoRA
      for a buffer, so the whole router is a `modules_to_save` module: P.mlp.gate.weight (base + LoRA
      delta, merged) and P.mlp.gate.e_score_correction_bias.

What PEFT 0.21 cannot represent is refused before training starts (`check_representable`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from darkhorse.checkpoint import write_safetensors
from darkhorse.config import ModelConfig
from darkhorse.errors import DarkhorseError
from darkhorse.files import read_json_object
from darkhorse.finetune.lora import LoRAExperts, LoRALinear, LoRARouter, LoRASpec, lora_modules, merged_weight
from darkhorse.interop.hf import adapter_for_export
from darkhorse.interop.hf.tensor_maps import PerExpert, TensorMap

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SIDECAR_FILE = "darkhorse_adapter.json"
SIDECAR_FORMAT = "darkhorse-lora-v1"
PREFIX = "base_model.model."
# model types whose FFN names PEFT's transformers-v5 conversion rewrites: any target module ending in
# gate_proj/up_proj/down_proj becomes the routed experts' fused parameters (peft 0.21,
# utils/transformers_weight_conversion.py), so shared experts and dense MLPs cannot be targeted there.
PEFT_REWRITES_MLP = ("deepseek_v3", "qwen2_moe", "qwen3_moe")


def transformers5_name(name: str) -> str:
    """An HF checkpoint name as transformers 5 names the parameter in memory (Mixtral's MoE block)."""
    return name.replace(".block_sparse_moe.", ".mlp.")


@dataclass(frozen=True)
class PeftTarget:
    """One darkhorse LoRA module and where PEFT holds it."""

    ours: str  # darkhorse module name, e.g. layers.0.ffn.experts
    group: str
    kind: str  # linear | router | experts | router_full
    path: str  # transformers module path, e.g. model.layers.0.mlp.experts


def keeps_updating_bias(config: ModelConfig, bias_update: bool) -> bool:
    return config.ffn == "moe" and bias_update and config.moe.bias_update_rate > 0


def check_representable(model: nn.Module, config: ModelConfig, spec: LoRASpec, bias_update: bool) -> str:
    """The HF architecture the adapter will be saved for; raises naming what PEFT cannot hold."""
    adapter = adapter_for_export(config)  # refuses (one line) what no HF architecture represents
    if adapter.model_type in PEFT_REWRITES_MLP:
        blocked = [g for g in ("shared_experts", "dense_mlp") if g in spec.targets]
        if blocked:
            raise DarkhorseError(
                f"--lora-targets {', '.join(blocked)}: PEFT cannot hold a LoRA there for {adapter.architecture} "
                "(its transformers-v5 conversion turns every gate_proj/up_proj/down_proj target into the routed "
                "experts' fused parameters); drop them from --lora-targets"
            )
    uses_parameters = any(g in spec.targets for g in ("routed_experts", "router"))
    if uses_parameters and spec.dropout > 0:
        raise DarkhorseError(
            "--lora-dropout must be 0 with the router or routed_experts targets: PEFT's LoRA for parameters "
            "(target_parameters, lora.ParamWrapper) cannot apply dropout, so the adapter would not load"
        )
    return adapter.architecture


def peft_targets(model: nn.Module, config: ModelConfig, bias_update: bool) -> list[PeftTarget]:
    maps: dict[str, TensorMap] = {m.ours: m for m in adapter_for_export(config).tensor_maps(config)}
    router_full = keeps_updating_bias(config, bias_update)
    targets = []
    for name, module in lora_modules(model):
        if isinstance(module, LoRAExperts):
            fused = {maps[f"{name}.{p}"].fused for p in ("gate_proj", "up_proj", "down_proj")}
            if not all(isinstance(maps[f"{name}.{p}"], PerExpert) for p in ("gate_proj", "down_proj")) or "" in fused:
                raise DarkhorseError(f"{name}: no fused transformers-5 expert tensors to hold an expert LoRA")
            path = transformers5_name(maps[f"{name}.down_proj"].fused).rsplit(".", 1)[0]
            targets.append(PeftTarget(name, module.lora_group, "experts", path))
            continue
        tensor_map = maps[f"{name}.weight"]
        if type(tensor_map) is not TensorMap:
            raise DarkhorseError(f"{name}.weight is stored transformed in HF ({type(tensor_map).__name__})")
        path = transformers5_name(tensor_map.hf[0]).removesuffix(".weight")
        if isinstance(module, LoRARouter):
            targets.append(PeftTarget(name, module.lora_group, "router_full" if router_full else "router", path))
        else:
            targets.append(PeftTarget(name, module.lora_group, "linear", path))
    return targets


def _pattern(path: str) -> str:
    """A rank_pattern key matching one layer's path in any layer."""
    return re.sub(r"layers\\\.\d+\\\.", r"layers\\.\\d+\\.", re.escape(path))


def adapter_config(
    targets: list[PeftTarget], spec: LoRASpec, base_name: str, dropout: float | None = None
) -> dict[str, Any]:
    modules = [t.path for t in targets if t.kind == "linear"]
    parameters = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for t in targets:
        rank = spec.rank(t.group)
        if t.kind == "router":
            parameters.append(t.path + ".weight")
            if rank != spec.r:
                rank_pattern[_pattern(t.path + ".weight")] = rank
        elif t.kind == "experts":
            parameters += [t.path + ".gate_up_proj", t.path + ".down_proj"]
            rank_pattern[_pattern(t.path + ".gate_up_proj")] = 2 * rank
            alpha_pattern[_pattern(t.path + ".gate_up_proj")] = 2 * spec.alpha
            if rank != spec.r:
                rank_pattern[_pattern(t.path + ".down_proj")] = rank
        elif t.kind == "linear" and rank != spec.r:
            rank_pattern[_pattern(t.path)] = rank
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout if dropout is None else dropout,
        "target_modules": modules or None,
        "target_parameters": parameters or None,
        "modules_to_save": [t.path for t in targets if t.kind == "router_full"] or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _expert_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our A [E, r, in], B [E, out, r] as ParamWrapper's lora_A [E*r, in] and lora_B [out, r*E]."""
    experts, out, rank = b.shape
    return a.reshape(experts * rank, a.shape[-1]), b.permute(1, 2, 0).reshape(out, rank * experts)


@torch.no_grad()
def peft_tensors(model: nn.Module, targets: list[PeftTarget]) -> list[tuple[str, torch.Tensor]]:
    """The adapter's tensors under PEFT's keys (fp32, CPU)."""
    modules = dict(model.named_modules())
    tensors: list[tuple[str, torch.Tensor]] = []
    for t in targets:
        module = modules[t.ours]
        key = PREFIX + t.path
        if t.kind == "experts":
            a_gate, a_up = module.gate_proj_lora_A, module.up_proj_lora_A
            b_gate, b_up = module.gate_proj_lora_B, module.up_proj_lora_B
            a_fused = torch.cat([a_gate, a_up], dim=1)
            b_fused = torch.zeros(b_gate.shape[0], 2 * b_gate.shape[1], 2 * b_gate.shape[2], dtype=b_gate.dtype)
            b_fused[:, : b_gate.shape[1], : b_gate.shape[2]] = b_gate.cpu()
            b_fused[:, b_gate.shape[1] :, b_gate.shape[2] :] = b_up.cpu()
            lora_a, lora_b = _expert_factors(a_fused.cpu(), b_fused)
            tensors += [(f"{key}.base_layer.lora_A.weight", lora_a), (f"{key}.base_layer.lora_B.weight", lora_b)]
            lora_a, lora_b = _expert_factors(module.down_proj_lora_A.cpu(), module.down_proj_lora_B.cpu())
            tensors += [(f"{key}.lora_A.weight", lora_a), (f"{key}.lora_B.weight", lora_b)]
        elif t.kind == "router_full":
            tensors.append((f"{key}.weight", merged_weight(module).cpu()))
            tensors.append((f"{key}.e_score_correction_bias", module.e_score_correction_bias.float().cpu()))
        else:
            assert isinstance(module, LoRALinear | LoRARouter)
            tensors += [(f"{key}.lora_A.weight", module.lora_A.cpu()), (f"{key}.lora_B.weight", module.lora_B.cpu())]
    return [(name, tensor.detach().float().contiguous()) for name, tensor in tensors]


def write_adapter(
    folder: Path, model: nn.Module, targets: list[PeftTarget], spec: LoRASpec, sidecar: dict[str, Any]
) -> None:
    """adapter_config.json, adapter_model.safetensors and darkhorse_adapter.json into `folder`."""
    base_name = sidecar["base"].get("hf_dir") or sidecar["base"]["path"]
    (folder / CONFIG_FILE).write_text(json.dumps(adapter_config(targets, spec, base_name), indent=2) + "\n")
    write_safetensors(folder / WEIGHTS_FILE, peft_tensors(model, targets), {"format": "pt"})
    record = {
        "format": SIDECAR_FORMAT,
        **sidecar,
        "lora": spec.to_dict(),
        "targets": [{"ours": t.ours, "group": t.group, "kind": t.kind, "hf": t.path} for t in targets],
    }
    (folder / SIDECAR_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_sidecar(folder: Path) -> dict[str, Any] | None:
    """The adapter directory's darkhorse_adapter.json, checked; None when it has none (PEFT's own adapters)."""
    path = Path(folder) / SIDECAR_FILE
    if not path.is_file():
        return None
    record = read_json_object(path)
    base = record.get("base")
    if record.get("format") != SIDECAR_FORMAT or not isinstance(base, dict) or not base.get("fingerprint"):
        raise DarkhorseError(
            f"{path}: not a {SIDECAR_FORMAT} record with base.path and base.fingerprint (darkhorse finetune "
            "writes it); remove it and pass --base to use the adapter as a plain PEFT one"
        )
    return record


def check_base(adapter_dir: Path, trained_on: dict[str, Any], base: Path, fingerprint: str, doing: str) -> None:
    """Refuse, naming both, a base whose weights are not the ones the adapter was trained on."""
    expected = trained_on["fingerprint"]
    if fingerprint != expected:
        raise DarkhorseError(
            f"adapter {adapter_dir} was trained on base {trained_on.get('path', '?')} (weights {expected[:19]}...), "
            f"not on {base} (weights {fingerprint[:19]}...): refusing to {doing} a different base"
        )
