"""Merge a PEFT LoRA adapter into its base: a standalone checkpoint (or HF directory) with W += s * B @ A.

The adapter is what PEFT's `save_pretrained` writes (and what `darkhorse finetune` writes):
`adapter_config.json` plus `adapter_model.safetensors` keyed by the base's Hugging Face module names,
`base_model.model.<module>[.base_layer...].lora_{A,B}.weight`. Each pair is turned into a delta with
PEFT's own rules (peft/tuners/lora/layer.py, 0.21):

- a `target_modules` Linear, or a 2-D `target_parameters` entry: delta = s * B @ A, shaped [out, in];
- a 3-D `target_parameters` entry (fused experts, [E, out, in]): A is [r*E, in] read as (E, r, in) and
  B is [out, r*E] read as (out, r, E); delta[e] = s * B[:, :, e] @ A[e] (`ParamWrapper.get_delta_weight`);
- several parameters of one module (an expert block's gate_up_proj and down_proj) nest their wrappers:
  the parameter registered first is innermost, so its keys carry the most `.base_layer` segments;
- s = alpha / r, or alpha / sqrt(r) with `use_rslora`; `rank_pattern` / `alpha_pattern` are matched
  against the module name (target_modules) or `<module>.<parameter>` (target_parameters) as PEFT does.

HF names become darkhorse tensors through the family's tensor maps (interop/hf): a fused `gate_up_proj`
delta splits into our gate_proj and up_proj rows, a per-expert `experts.{j}.w1` delta lands in expert j,
a padded vocabulary takes the delta in its first rows. Every pair is checked (name known, shape exact)
before any weight changes, so a mismatch raises instead of leaving the base weight in place; a target
whose delta is zero (or vanishes when added) is refused unless allowed, since it merges to the base.

A whole module PEFT saves (`modules_to_save`: `base_model.model.<module>.<tensor>`, no lora_ key) replaces
the base's tensors; `darkhorse finetune` saves a DeepSeek-style router that way (its selection bias kept
updating: merged weight + bias).

`darkhorse_adapter.json` beside the adapter (written by `darkhorse finetune`, read by
`peft_format.read_sidecar`) names the base and its `checkpoint.weights_fingerprint` (over darkhorse
tensor names, so an HF directory and its import hash alike); a different base is refused with both
names. Without it (PEFT's own adapters), `--base` is required.
The output is written atomically: a failed merge leaves nothing at --out.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from darkhorse.checkpoint import check_finite, load_model, save_model_checkpoint, weights_fingerprint
from darkhorse.config import RunConfig
from darkhorse.errors import DarkhorseError
from darkhorse.files import atomic_dir, read_json_object
from darkhorse.finetune.lora import lora_delta
from darkhorse.finetune.peft_format import CONFIG_FILE, SIDECAR_FILE, WEIGHTS_FILE, check_base, read_sidecar
from darkhorse.finetune.peft_format import PREFIX as KEY_PREFIX
from darkhorse.finetune.run import resolve_base
from darkhorse.interop.hf.base import HFAdapter
from darkhorse.interop.hf.tensor_maps import OursOnly, PaddedRows, PerExpert, TensorMap
from darkhorse.interop.safetensors_io import SafetensorsDir

FORMATS = ("darkhorse", "hf")
# adapter_config.json settings that change what the saved tensors mean, with the value merge supports.
UNSUPPORTED_SETTINGS = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "trainable_token_indices": None,
    "layer_replication": None,
}


# ---------------------------------------------------------------------------------------------
# The adapter on disk


@dataclass
class LoraPair:
    """One saved lora_A / lora_B pair: the PEFT module path and how deep its wrapper is nested."""

    module: str
    depth: int  # `.base_layer` segments between the module and `lora_A`
    a: torch.Tensor
    b: torch.Tensor

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.module + ".base_layer" * self.depth + ".lora_A.weight"


@dataclass
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    pairs: list[LoraPair]
    saved: dict[str, torch.Tensor]  # modules_to_save tensors by HF name: they replace the base's
    sidecar: dict[str, Any] | None


def _saved_module(key: str, modules: list[str]) -> bool:
    """Whether `key` is a tensor of a `modules_to_save` module (PEFT matches the module name's end)."""
    module = key[len(KEY_PREFIX) :].rpartition(".")[0]
    return key.startswith(KEY_PREFIX) and any(module == m or module.endswith("." + m) for m in modules)


def _split_key(key: str, where: Path) -> tuple[str, int, str]:
    """`base_model.model.M.base_layer.lora_A.weight` -> (M, 1, "A"); anything else is refused by name."""
    if not key.startswith(KEY_PREFIX):
        raise DarkhorseError(f"{where}: key {key!r} is not a PEFT LoRA key (no {KEY_PREFIX!r} prefix)")
    rest = key[len(KEY_PREFIX) :]
    match = re.fullmatch(r"(.+?)((?:\.base_layer)*)\.lora_([AB])\.weight", rest)
    if match is None:
        kind = (
            "an embedding LoRA (lora_embedding_A/B)"
            if ".lora_embedding_" in rest
            else "a DoRA magnitude"
            if "lora_magnitude_vector" in rest
            else "a full weight, not a LoRA factor (modules_to_save or saved embedding layers)"
        )
        raise DarkhorseError(f"{where}: key {key!r} is {kind}; darkhorse merge supports LoRA A/B factors only")
    return match.group(1), match.group(2).count(".base_layer"), match.group(3)


def read_adapter(adapter_dir: str | Path) -> LoraAdapter:
    """The adapter's config, its A/B pairs and the darkhorse sidecar (None when absent), all checked."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise DarkhorseError(f"adapter directory not found: {path}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            other = " (adapter_model.bin is not read: re-save with safe_serialization=True)" if (
                name == WEIGHTS_FILE and (path / "adapter_model.bin").is_file()
            ) else ""  # fmt: skip
            raise DarkhorseError(f"{path}: no {name}; is this a PEFT adapter directory (RUN_DIR/final)?{other}")
    config = read_json_object(path / CONFIG_FILE)
    if config.get("peft_type") != "LORA":
        raise DarkhorseError(f"{path / CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not LORA")
    for setting, supported in UNSUPPORTED_SETTINGS.items():
        if config.get(setting, supported) not in (supported, [], {}):
            raise DarkhorseError(
                f"{path / CONFIG_FILE}: {setting}={config[setting]!r} is not supported by darkhorse merge"
            )
    weights = SafetensorsDir(path, single_file=WEIGHTS_FILE)
    factors: dict[tuple[str, int], dict[str, torch.Tensor]] = defaultdict(dict)
    saved: dict[str, torch.Tensor] = {}
    for key in sorted(weights.names()):
        if ".lora_" not in key and _saved_module(key, config.get("modules_to_save") or []):
            saved[key[len(KEY_PREFIX) :]] = weights.get(key)
            continue
        module, depth, which = _split_key(key, path / WEIGHTS_FILE)
        factors[module, depth][which] = weights.get(key).float()
    pairs = []
    for (module, depth), found in factors.items():
        if set(found) != {"A", "B"}:
            lacking = "lora_B" if "A" in found else "lora_A"
            raise DarkhorseError(f"{path / WEIGHTS_FILE}: {module} has no {lacking} weight")
        pairs.append(LoraPair(module, depth, found["A"], found["B"]))
    if not pairs and not saved:
        raise DarkhorseError(f"{path / WEIGHTS_FILE}: holds no LoRA weights")
    return LoraAdapter(path, config, pairs, saved, read_sidecar(path))


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    """PEFT's `get_pattern_key`: the first pattern that matches the end of `key` at a dot boundary."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return patterns.get(key, default)


# ---------------------------------------------------------------------------------------------
# HF names -> darkhorse tensors (through the family's tensor maps)


@dataclass(frozen=True)
class Part:
    """Where (a slice of) the delta of one HF tensor lands: our tensor `ours`, expert `expert` of it or
    all of it, taking `rows` of the HF tensor's dim 1 (fused experts) or its leading rows (`padded`)."""

    ours: str
    expert: int | None = None
    rows: tuple[int, int] | None = None
    padded: bool = False


def hf_places(maps: Iterable[TensorMap]) -> dict[str, list[Part]]:
    """Every HF tensor name a LoRA may target -> where its delta goes, in the order HF registers them."""
    places: dict[str, list[Part]] = {}
    for tensor_map in maps:
        if isinstance(tensor_map, OursOnly):
            continue
        if isinstance(tensor_map, PerExpert):
            for j, name in enumerate(tensor_map.hf):
                places[name] = [Part(tensor_map.ours, expert=j)]
            if tensor_map.fused:
                places.setdefault(tensor_map.fused, []).append(Part(tensor_map.ours, rows=tensor_map.rows))
            continue
        for name in (tensor_map.hf[0], *tensor_map.alt):  # hf[1:] are export-only copies
            places[name] = [Part(tensor_map.ours, padded=isinstance(tensor_map, PaddedRows))]
    return places


def hf_shape(parts: list[Part], state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The shape the HF tensor has (what PEFT's delta for it has); a padded vocabulary's rows are a bound."""
    first = state[parts[0].ours]
    if parts[0].expert is not None:
        return tuple(first.shape[1:])
    if parts[0].rows is not None:
        return (first.shape[0], max(p.rows[1] for p in parts), *first.shape[2:])
    return tuple(first.shape)


@dataclass
class Target:
    """One LoRA pair resolved: the HF tensor it adapts, its delta and where that goes; or (`replace`, rank
    0) a modules_to_save tensor that takes the base tensor's place."""

    hf_name: str
    parts: list[Part]
    delta: torch.Tensor
    rank: int
    scaling: float
    replace: bool = False


def _resolve_name(
    pair: LoraPair, config: dict[str, Any], places: dict[str, list[Part]], where: Path
) -> tuple[str, bool]:
    """(HF name, is a target_parameters entry) of the tensor a pair adapts: a targeted parameter of its
    module (picked by nesting depth), else the module's `.weight` (target_modules)."""
    targets = config.get("target_parameters") or []
    on_module = [
        name
        for name in places
        if name.rpartition(".")[0] == pair.module and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if on_module:
        if pair.depth >= len(on_module):
            raise DarkhorseError(
                f"{where}: {pair.key} is nested {pair.depth} deep but {pair.module} has only "
                f"{len(on_module)} targeted parameter(s) ({', '.join(on_module)})"
            )
        return on_module[len(on_module) - 1 - pair.depth], True
    name = pair.module + ".weight"
    if pair.depth or name not in places:
        tied = " (tied to the embedding, which merging would change too)" if name == "lm_head.weight" else ""
        raise DarkhorseError(
            f"{where}: {pair.key} targets {pair.module}, which is no weight of this base{tied}; "
            "an adapter for another architecture or shape of model?"
        )
    return name, False


def _delta(pair: LoraPair, shape: tuple[int, ...], rank: int, scaling: float, name: str, where: Path) -> torch.Tensor:
    """PEFT's delta for `pair` on a tensor of `shape`; any shape that does not fit raises."""
    a, b = pair.a, pair.b
    experts = shape[0] if len(shape) == 3 else 1
    out_features, in_features = shape[-2], shape[-1]
    expected_a, expected_b = (rank * experts, in_features), (out_features, rank * experts)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise DarkhorseError(
            f"{where}: {name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base tensor "
            f"{shape} at r={rank} (expected {expected_a} / {expected_b}); wrong base or a corrupted adapter"
        )
    if len(shape) == 3:  # PEFT's expert-major A rows and expert-fastest B columns, as [E, r, in] / [E, out, r]
        a, b = a.reshape(experts, rank, in_features), b.reshape(out_features, rank, experts).permute(2, 0, 1)
    return lora_delta(a, b, scaling)


def _saved_target(name: str, tensor: torch.Tensor, places: dict[str, list[Part]], state, where: Path) -> Target:
    """A modules_to_save tensor as a replacement of exactly one base tensor of exactly its shape."""
    parts = places.get(name)
    if not parts or len(parts) != 1 or parts[0].expert is not None or parts[0].rows is not None:
        raise DarkhorseError(f"{where}: saved module tensor {name} is no whole tensor of this base")
    if tuple(tensor.shape) != tuple(state[parts[0].ours].shape):
        raise DarkhorseError(
            f"{where}: saved module tensor {name} {tuple(tensor.shape)} does not fit the base tensor "
            f"{tuple(state[parts[0].ours].shape)}; wrong base or a corrupted adapter"
        )
    return Target(name, parts, tensor.float(), 0, 0.0, replace=True)


def resolve_targets(adapter: LoraAdapter, maps: list[TensorMap], state: dict[str, torch.Tensor]) -> list[Target]:
    """Every pair as a checked delta on our tensors; raises on the first name or shape that does not fit."""
    config = adapter.config
    where = adapter.path / WEIGHTS_FILE
    places = hf_places(maps)
    default_r, default_alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    targets, seen = [], {}
    for pair in sorted(adapter.pairs, key=lambda p: (p.module, p.depth)):
        name, is_param = _resolve_name(pair, config, places, where)
        if name in seen:
            raise DarkhorseError(f"{where}: {name} is adapted twice ({seen[name]} and {pair.key})")
        seen[name] = pair.key
        parts = places[name]
        shape = hf_shape(parts, state)
        key = name if is_param else pair.module  # what PEFT matches rank_pattern / alpha_pattern against
        rank = int(_pattern_value(config.get("rank_pattern") or {}, key, default_r))
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, key, default_alpha))
        if rank <= 0:
            raise DarkhorseError(f"{adapter.path / CONFIG_FILE}: r={rank} for {key}; it must be positive")
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        if parts[0].padded and pair.b.shape[0] <= shape[0]:
            shape = (pair.b.shape[0], *shape[1:])  # an HF vocabulary may be smaller than our padded one
        targets.append(Target(name, parts, _delta(pair, shape, rank, scaling, name, where), rank, scaling))
    for name, tensor in sorted(adapter.saved.items()):
        if name in seen:
            raise DarkhorseError(f"{where}: {name} is both a LoRA target and a saved module tensor")
        targets.append(_saved_target(name, tensor, places, state, where))
    return targets


# ---------------------------------------------------------------------------------------------
# Applying the deltas


@dataclass
class TargetReport:
    hf_name: str
    rank: int
    scaling: float
    relative_delta: float  # |delta| / |W| (Frobenius, over what the target touches)
    changed: int  # weights whose stored value changed


def _view(state: dict[str, torch.Tensor], part: Part) -> torch.Tensor:
    tensor = state[part.ours]
    return tensor[part.expert] if part.expert is not None else tensor


def _piece(delta: torch.Tensor, part: Part) -> torch.Tensor:
    return delta[:, part.rows[0] : part.rows[1]] if part.rows is not None else delta


def apply_targets(model: torch.nn.Module, targets: list[Target]) -> list[TargetReport]:
    """Add every delta to our weights (in fp32, stored back in each weight's dtype); report what changed."""
    state = model.state_dict()
    reports = []
    with torch.no_grad():
        for target in targets:
            changed, delta_sq, weight_sq = 0, 0.0, 0.0
            for part in target.parts:
                weight = _view(state, part)
                piece = _piece(target.delta, part)
                if part.padded:
                    weight = weight[: piece.shape[0]]
                merged = (piece if target.replace else weight.float() + piece).to(weight.dtype)
                changed += int((merged != weight).sum())
                delta_sq += float((merged.float() - weight.float()).square().sum())
                weight_sq += float(weight.float().square().sum())
                weight.copy_(merged)
            relative = math.sqrt(delta_sq / weight_sq) if weight_sq else math.inf
            reports.append(TargetReport(target.hf_name, target.rank, target.scaling, relative, changed))
    return reports


# ---------------------------------------------------------------------------------------------
# The base and the merge


@dataclass
class LoadedBase:
    """The base a merge writes into: its model as loaded, and the HF family whose names the adapter uses."""

    model: torch.nn.Module
    config: RunConfig
    meta: dict[str, Any]
    tokenizer_file: Path
    adapter: HFAdapter


def load_base(path: str | Path, scratch: Path) -> LoadedBase:
    """A darkhorse checkpoint, or an HF directory imported into `scratch` first (`run.resolve_base`, as
    finetune reads its base), with the HF family whose names the adapter's keys use."""
    from darkhorse.interop.hf import adapter_for_export, adapter_for_import

    resolved = resolve_base(path, scratch)
    model, config, meta = load_model(resolved.checkpoint)
    if resolved.hf_dir is not None:
        adapter = adapter_for_import(read_json_object(resolved.hf_dir / "config.json"), str(resolved.hf_dir))
    else:
        try:
            adapter = adapter_for_export(config.model)
        except DarkhorseError as exc:
            raise DarkhorseError(f"base {path} has no Hugging Face layout for PEFT names: {exc}") from None
    return LoadedBase(model, config, meta, resolved.checkpoint / "tokenizer.json", adapter)


@dataclass
class MergeResult:
    out: Path
    base: Path
    fingerprint: str  # checkpoint.weights_fingerprint of the base
    targets: list[TargetReport] = field(default_factory=list)

    @property
    def zero(self) -> list[TargetReport]:
        return [t for t in self.targets if t.changed == 0]


def _base_path(adapter: LoraAdapter, base: str | Path | None) -> Path:
    if base is not None:
        return Path(base)
    if adapter.sidecar is None:
        raise DarkhorseError(
            f"{adapter.path} has no {SIDECAR_FILE} naming its base; pass --base (the model it was trained on)"
        )
    return Path(adapter.sidecar["base"]["path"])


def merge_adapter(
    adapter_dir: str | Path,
    out: str | Path,
    *,
    base: str | Path | None = None,
    fmt: str = "darkhorse",
    force: bool = False,
    allow_zero_delta: bool = False,
) -> MergeResult:
    """Merge the PEFT LoRA adapter at `adapter_dir` into its base and write `out` (a checkpoint, or an
    HF directory with fmt="hf"). Nothing is written unless every check passes."""
    if fmt not in FORMATS:
        raise DarkhorseError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    adapter = read_adapter(adapter_dir)
    base_path = _base_path(adapter, base)
    out = Path(out)
    with atomic_dir(out, force=force) as staging:
        scratch = staging.parent  # the private temp dir atomic_dir removes in any case
        loaded = load_base(base_path, scratch)
        fingerprint = weights_fingerprint(loaded.model)
        if adapter.sidecar is not None:
            check_base(adapter.path, adapter.sidecar["base"], base_path, fingerprint, "merge into")
        maps = loaded.adapter.tensor_maps(loaded.config.model)
        targets = resolve_targets(adapter, maps, loaded.model.state_dict())
        result = MergeResult(out, base_path, fingerprint, apply_targets(loaded.model, targets))
        for name, tensor in loaded.model.state_dict().items():  # a diverged adapter merges into NaN
            check_finite(tensor, name, adapter.path)
        if result.zero and not allow_zero_delta:
            names = ", ".join(t.hf_name for t in result.zero[:4]) + (" ..." if len(result.zero) > 4 else "")
            raise DarkhorseError(
                f"{len(result.zero)} of {len(result.targets)} adapted tensors do not change ({names}): the "
                "adapter's delta is zero there (an untrained LoRA B?); pass --allow-zero-delta to merge anyway"
            )
        meta = {
            "step": 0,
            "tokens_seen": 0,
            "loss": None,
            **({"import": loaded.meta["import"]} if "import" in loaded.meta else {}),
            "merge": {
                "adapter": str(adapter.path.resolve()),
                "base": str(base_path.resolve()),
                "base_fingerprint": fingerprint,
                "targets": len(result.targets),
            },
        }
        if fmt == "darkhorse":
            save_model_checkpoint(staging, loaded.model, loaded.config, loaded.tokenizer_file, meta)
        else:
            from darkhorse.interop.export import export_hf

            merged = save_model_checkpoint(scratch / "merged", loaded.model, loaded.config, loaded.tokenizer_file, meta)
            export_hf(merged, staging, force=True)
    return result
