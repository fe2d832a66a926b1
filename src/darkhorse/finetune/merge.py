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

`darkhorse_adapter.json` beside the adapter (written by `darkhorse finetune`) names the base and the
sha256 of its weights (`base_weights_sha256`, over darkhorse tensor names, so an HF directory and its
import hash alike); a different base is refused with both names. Without it, `--base` is required.
The output is written atomically: a failed merge leaves nothing at --out.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from darkhorse.checkpoint import is_complete, load_model, save_model_checkpoint, unique_state
from darkhorse.config import RunConfig
from darkhorse.errors import DarkhorseError
from darkhorse.files import atomic_dir, read_json_object
from darkhorse.interop.hf.base import HFAdapter
from darkhorse.interop.hf.tensor_maps import OursOnly, PaddedRows, PerExpert, TensorMap
from darkhorse.interop.safetensors_io import SafetensorsDir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SIDECAR_FILE = "darkhorse_adapter.json"  # {"base": path, "base_sha256": hex, "config": darkhorse config}
KEY_PREFIX = "base_model.model."
FORMATS = ("darkhorse", "hf")
# adapter_config.json settings that change what the saved tensors mean, with the value merge supports.
UNSUPPORTED_SETTINGS = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "modules_to_save": None,
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
    sidecar: dict[str, Any] | None


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
    for key in sorted(weights.names()):
        module, depth, which = _split_key(key, path / WEIGHTS_FILE)
        factors[module, depth][which] = weights.get(key).float()
    pairs = []
    for (module, depth), found in factors.items():
        if set(found) != {"A", "B"}:
            lacking = "lora_B" if "A" in found else "lora_A"
            raise DarkhorseError(f"{path / WEIGHTS_FILE}: {module} has no {lacking} weight")
        pairs.append(LoraPair(module, depth, found["A"], found["B"]))
    if not pairs:
        raise DarkhorseError(f"{path / WEIGHTS_FILE}: holds no LoRA weights")
    sidecar = read_json_object(path / SIDECAR_FILE) if (path / SIDECAR_FILE).is_file() else None
    return LoraAdapter(path, config, pairs, sidecar)


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
    """One LoRA pair resolved: the HF tensor it adapts, its delta and where that goes."""

    hf_name: str
    parts: list[Part]
    delta: torch.Tensor
    rank: int
    scaling: float


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
    if len(shape) == 2:
        return (b @ a) * scaling
    a3 = a.reshape(experts, rank, in_features)
    b3 = b.reshape(out_features, rank, experts)
    return torch.einsum("ore,eri->eoi", b3, a3) * scaling


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
                merged = (weight.float() + piece).to(weight.dtype)
                changed += int((merged != weight).sum())
                delta_sq += float(piece.square().sum())
                weight_sq += float(weight.float().square().sum())
                weight.copy_(merged)
            relative = math.sqrt(delta_sq / weight_sq) if weight_sq else math.inf
            reports.append(TargetReport(target.hf_name, target.rank, target.scaling, relative, changed))
    return reports


def base_weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every persistent tensor (name, dtype, shape, bytes) in darkhorse's names.

    The same weights hash alike whether they come from an HF directory or from its import."""
    digest = hashlib.sha256()
    for name, tensor in unique_state(model):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        digest.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The base and the merge


@dataclass
class Base:
    model: torch.nn.Module
    config: RunConfig
    meta: dict[str, Any]
    tokenizer_file: Path
    adapter: HFAdapter  # the HF family whose names the adapter uses


def load_base(path: str | Path, scratch: Path) -> Base:
    """A darkhorse checkpoint, or an HF directory imported into `scratch` first."""
    from darkhorse.interop.hf import adapter_for_export, adapter_for_import
    from darkhorse.interop.hf_import import import_hf

    path = Path(path)
    if not path.is_dir():
        raise DarkhorseError(f"base not found: {path}")
    if is_complete(path):
        folder = path
        model, config, meta = load_model(folder)
        try:
            adapter = adapter_for_export(config.model)
        except DarkhorseError as exc:
            raise DarkhorseError(f"base {path} has no Hugging Face layout for PEFT names: {exc}") from None
    elif (path / "config.json").is_file():
        folder = import_hf(path, scratch / "base")
        model, config, meta = load_model(folder)
        adapter = adapter_for_import(read_json_object(path / "config.json"), str(path / "config.json"))
    else:
        raise DarkhorseError(f"{path} is neither a darkhorse checkpoint (meta.json + model.safetensors) nor a "
                             "Hugging Face model directory (config.json)")  # fmt: skip
    return Base(model, config, meta, folder / "tokenizer.json", adapter)


@dataclass
class MergeResult:
    out: Path
    base: Path
    base_sha256: str
    targets: list[TargetReport] = field(default_factory=list)

    @property
    def zero(self) -> list[TargetReport]:
        return [t for t in self.targets if t.changed == 0]


def _base_path(adapter: LoraAdapter, base: str | Path | None) -> Path:
    if base is not None:
        return Path(base)
    if adapter.sidecar is None or not adapter.sidecar.get("base"):
        raise DarkhorseError(
            f"{adapter.path} has no {SIDECAR_FILE} naming its base; pass --base (the model it was trained on)"
        )
    return Path(adapter.sidecar["base"])


def _check_base_hash(adapter: LoraAdapter, base: Path, sha256: str) -> None:
    if adapter.sidecar is None:
        return
    expected = adapter.sidecar.get("base_sha256")
    if not expected:
        raise DarkhorseError(f"{adapter.path / SIDECAR_FILE}: no base_sha256")
    if expected != sha256:
        trained_on = adapter.sidecar.get("base", "?")
        raise DarkhorseError(
            f"adapter {adapter.path} was trained on base {trained_on} (weights sha256 {expected[:12]}), "
            f"not on {base} (sha256 {sha256[:12]}): refusing to merge into a different base"
        )


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
        sha256 = base_weights_sha256(loaded.model)
        _check_base_hash(adapter, base_path, sha256)
        maps = loaded.adapter.tensor_maps(loaded.config.model)
        targets = resolve_targets(adapter, maps, loaded.model.state_dict())
        result = MergeResult(out, base_path, sha256, apply_targets(loaded.model, targets))
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
                "base_sha256": sha256,
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
