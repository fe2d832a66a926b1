"""`finetune`: LoRA on a frozen base (a darkhorse checkpoint or a Hugging Face directory) with the one trainer.

The trainer (darkhorse.train) runs the steps; `LoRAHooks` is what makes it a LoRA run: it loads the
base, freezes it (optionally in bf16), adds the adapters (finetune/lora.py) before the optimizers are
built, so only they enter them, keeps the router LoRA frozen for the first `freeze_steps` steps (in
the optimizer from the start without gradients, so its AdamW state begins at that step), adds the
router losses, and saves checkpoints that hold only the adapters (PEFT's layout, finetune/peft_format.py)
and their optimizer state. Everything a resume needs is in trainer_state.pt, so a resumed run repeats
the uninterrupted one exactly. At the start and the end it measures per-layer expert load on fixed
batches with the adapters off (the base) and on, and reports how routing drifted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from darkhorse import __version__
from darkhorse import checkpoint as ckpt
from darkhorse.config import RunConfig, load_run_config, run_config_from_dict
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.errors import DarkhorseError
from darkhorse.files import atomic_dir
from darkhorse.finetune.chat_data import prepare_for_base
from darkhorse.finetune.lora import (
    LoRASpec,
    apply_lora,
    lora_modules,
    lora_parameters,
    set_group_trainable,
    trainable_by_group,
)
from darkhorse.finetune.peft_format import (
    SIDECAR_FILE,
    check_base,
    check_representable,
    keeps_updating_bias,
    peft_targets,
    read_sidecar,
    write_adapter,
)
from darkhorse.model import Transformer
from darkhorse.model.moe import MoE, Routing
from darkhorse.train.reports import write_load_heatmaps
from darkhorse.train.routing import RoutingCounter, routing_drift
from darkhorse.train.run_dir import claimed_run_dir, find_resume_checkpoint, plan_run
from darkhorse.train.trainer import Trainer, TrainingHooks, TrainResult

# train.* defaults of a LoRA run where they differ from pre-training's (PEFT/HF Trainer's choices)
TRAIN_DEFAULTS = {"lr": 1e-4, "weight_decay": 0.0, "warmup_steps": 10, "max_steps": 200, "save_interval": 100}
PROBE_BATCHES = 4  # fixed batches the routing before/after is measured on
# the command-line flag of each LoRASpec / RouterOptions field and of the base dtype (for one-line refusals)
FLAGS = {
    "targets": "--lora-targets", "r": "--lora-r", "expert_r": "--expert-lora-r", "router_r": "--router-lora-r",
    "alpha": "--lora-alpha", "dropout": "--lora-dropout", "freeze_steps": "--router-freeze-steps",
    "aux_loss_coef": "--router-aux-loss-coef", "z_loss_coef": "--router-z-loss-coef",
    "entropy_coef": "--router-entropy-coef", "bias_update": "--no-bias-update", "base_dtype": "--base-dtype",
}  # fmt: skip


@dataclass(frozen=True)
class RouterOptions:
    """The router's schedule and losses (coefficients of the terms added to the loss)."""

    freeze_steps: int = 0
    aux_loss_coef: float = 0.0  # Switch / Mixtral load balance: E * sum_e tokens_e * prob_e
    z_loss_coef: float = 0.0  # mean logsumexp(logits)^2
    entropy_coef: float = 0.0  # log E - H(mean router probabilities): 0 when the load is balanced
    bias_update: bool = True  # DeepSeek-style models keep updating their auxiliary-loss-free bias

    def __post_init__(self) -> None:
        if self.freeze_steps < 0:
            raise DarkhorseError(f"--router-freeze-steps must be >= 0, got {self.freeze_steps}")
        for name in ("aux_loss_coef", "z_loss_coef", "entropy_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise DarkhorseError(f"--router-{name.replace('_coef', '').replace('_', '-')}-coef must be >= 0")

    @property
    def has_losses(self) -> bool:
        return self.aux_loss_coef > 0 or self.z_loss_coef > 0 or self.entropy_coef > 0


@dataclass(frozen=True)
class Base:
    checkpoint: Path  # a darkhorse checkpoint (an HF base is imported into a temp dir)
    given: Path
    hf_dir: Path | None


def resolve_base(base: str | Path, scratch: Path) -> Base:
    """A darkhorse checkpoint as is, or a Hugging Face directory imported into `scratch`."""
    from darkhorse.interop.hf_import import import_hf

    given = Path(base)
    if not given.is_dir():
        raise DarkhorseError(f"base {given}: directory not found")
    if (given / ckpt.META_FILE).is_file():
        if not (given / ckpt.MODEL_FILE).is_file():
            raise DarkhorseError(f"base {given}: a darkhorse checkpoint without weights (no {ckpt.MODEL_FILE})")
        return Base(given, given, None)
    if (given / "config.json").is_file():
        if not any(given.glob("*.safetensors")):
            raise DarkhorseError(f"base {given}: a Hugging Face directory without weights (no *.safetensors)")
        return Base(import_hf(given, scratch / "base"), given, given)
    raise DarkhorseError(
        f"base {given}: neither a darkhorse checkpoint (meta.json) nor a Hugging Face model (config.json)"
    )


class RouterLosses:
    """Collects each training forward's routing decisions (forward hooks on the routers) and turns
    them into the router loss terms, over all MoE layers at once (as transformers' Mixtral does)."""

    def __init__(self, model: Transformer, options: RouterOptions) -> None:
        self.options = options
        self.routings: list[Routing] = []
        self.handles = [model.register_forward_pre_hook(lambda *_: self.routings.clear())]
        for module in model.layers.modules():
            if isinstance(module, MoE):
                self.handles.append(module.gate.register_forward_hook(self._keep))

    def _keep(self, router: torch.nn.Module, args: tuple, routing: Routing) -> None:
        if router.training:
            self.routings.append(routing)

    def terms(self) -> dict[str, torch.Tensor]:
        routings, self.routings = self.routings, []
        if not routings or not self.options.has_losses:
            return {}
        terms = {}
        experts = routings[0].scores.shape[-1]
        probs = torch.cat([r.scores / r.scores.sum(-1, keepdim=True) for r in routings])  # sigmoid: normalised
        if self.options.aux_loss_coef > 0:
            chosen = torch.cat([r.experts for r in routings])
            tokens = torch.zeros_like(probs).scatter_(1, chosen, 1.0).mean(0)  # share of tokens per expert
            balance = experts * (tokens * probs.mean(0)).sum()  # top-k at perfect balance
            terms["router_aux"] = self.options.aux_loss_coef * balance
        if self.options.z_loss_coef > 0:
            logits = torch.cat([r.logits for r in routings])
            terms["router_z"] = self.options.z_loss_coef * logits.logsumexp(-1).square().mean()
        if self.options.entropy_coef > 0:
            gaps = []
            for r in routings:
                mean = (r.scores / r.scores.sum(-1, keepdim=True)).mean(0)
                gaps.append(math.log(experts) + (mean * mean.clamp(min=1e-12).log()).sum())
            terms["router_entropy"] = self.options.entropy_coef * torch.stack(gaps).mean()
        return terms


class LoRAHooks(TrainingHooks):
    """The trainer hooks of a LoRA run (see the module docstring)."""

    command = "darkhorse finetune"
    sized_by_plan = False  # the frozen base has no gradients or optimizer state: sized after adapters are added

    def __init__(
        self,
        base: Base,
        spec: LoRASpec,
        router: RouterOptions,
        *,
        base_dtype: str = "fp32",
        resumed: tuple[Path, dict[str, Any]] | None = None,
    ) -> None:
        self.base, self.spec, self.router = base, spec, router
        self.base_dtype = base_dtype
        self.resumed = resumed  # (checkpoint, its sidecar's base record): the base must have its weights
        self.routing_before: tuple[list[int], torch.Tensor] | None = None

    # -- model ------------------------------------------------------------------------------------

    def load_weights(self, model: Transformer, plan, device: torch.device) -> None:
        ckpt.load_weights(model, self.base.checkpoint, device)
        self.fingerprint = ckpt.weights_fingerprint(model)  # as loaded, before any bf16 cast
        if self.resumed:
            check_base(self.resumed[0], self.resumed[1], self.base.given, self.fingerprint, "resume on")
        self.base_biases = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
        if self.base_dtype == "bf16":
            for param in model.parameters():
                if param.is_floating_point():
                    param.data = param.data.to(torch.bfloat16)
        apply_lora(model, self.spec)
        self.targets = peft_targets(model, plan.config.model, self.router.bias_update)
        self.losses = RouterLosses(model, self.router)
        self.model = model

    def before_step(self, trainer: Trainer) -> None:
        if "router" in self.spec.targets and self.router.freeze_steps > 0:
            set_group_trainable(self.model, "router", trainer.step >= self.router.freeze_steps)
            if trainer.step == self.router.freeze_steps:
                trainer.dashboard.message(f"step {trainer.step}: the router LoRA is released and trains from now on")

    def loss_terms(self) -> dict[str, torch.Tensor]:
        return self.losses.terms()

    def replicated_parameters(self, model: Transformer) -> list[torch.nn.Parameter]:
        return list(lora_parameters(model).values())  # under FSDP only the frozen base is sharded

    # -- state and checkpoints --------------------------------------------------------------------

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        tensors = {name: p.detach() for name, p in lora_parameters(self.model).items()}
        tensors.update({n: b for n, b in self.model.named_buffers() if n.endswith("e_score_correction_bias")})
        return {name: tensor.cpu().clone() for name, tensor in tensors.items()}

    def state(self) -> dict[str, Any]:
        return {"adapter": self._adapter_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        _load_adapter_state(self.model, state["adapter"])

    def sidecar(self, trainer: Trainer) -> dict[str, Any]:
        return {
            "base": {
                "path": str(self.base.given.resolve()),
                "kind": "hf" if self.base.hf_dir else "darkhorse",
                "hf_dir": str(self.base.hf_dir.resolve()) if self.base.hf_dir else None,
                "fingerprint": self.fingerprint,
            },
            "config": trainer.config.to_dict(),
            "router": dataclasses.asdict(self.router),
            "base_dtype": self.base_dtype,
            "step": trainer.step,
        }

    def save(self, trainer: Trainer, folder: Path, meta: dict[str, Any], state: dict[str, Any]) -> Path:
        record = {**meta, "config": trainer.config.to_dict(), "darkhorse_version": __version__, "lora": True}
        with atomic_dir(folder, force=True) as temp:
            write_adapter(temp, self.model, self.targets, self.spec, self.sidecar(trainer))
            (temp / ckpt.META_FILE).write_text(json.dumps(record, indent=2) + "\n")
            ckpt.save_trainer_state(state, temp / ckpt.STATE_FILE)
            ckpt.copy_tokenizer(trainer.tokenizer_file, temp)
        return folder

    # -- reports ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _as_base(self) -> Iterator[None]:
        """The model as the base computes: adapters scaled to 0, the base's selection biases."""
        modules = [module for _, module in lora_modules(self.model)]
        scalings = [module.lora_scaling for module in modules]
        buffers = dict(self.model.named_buffers())
        biases = {name: buffers[name].clone() for name in self.base_biases}
        try:
            for module in modules:
                module.lora_scaling = 0.0
            for name, bias in self.base_biases.items():
                buffers[name].copy_(bias)
            yield
        finally:
            for module, scaling in zip(modules, scalings, strict=True):
                module.lora_scaling = scaling
            for name, bias in biases.items():
                buffers[name].copy_(bias)

    @torch.no_grad()
    def _routing(self, trainer: Trainer) -> tuple[list[int], torch.Tensor]:
        batches = trainer.val_batches[:PROBE_BATCHES] or [trainer.loader.batch(0, 0)]
        self.model.eval()
        counter = RoutingCounter(self.model)
        try:
            for batch in batches:
                with trainer._autocast():
                    self.model(batch.inputs)
        finally:
            counter.remove()
            self.model.train()
        return counter.utilization()

    def on_start(self, trainer: Trainer) -> None:
        say = trainer.dashboard.message
        groups = trainable_by_group(self.model)
        total = sum(groups.values())
        base_params = sum(p.numel() for name, p in self.model.named_parameters() if "lora_" not in name)
        parts = " · ".join(f"{group.replace('_', ' ')} {count:,}" for group, count in groups.items())
        say(
            f"LoRA on {self.base.given} (frozen, {self.base_dtype}): {parts} = {total:,} trainable parameters "
            f"({100 * total / max(base_params, 1):.3f}% of {base_params:,}); adapter ~{4 * total / 2**20:.1f} MiB"
        )
        if "router" in self.spec.targets and self.router.freeze_steps > trainer.step:
            say(f"the router LoRA stays frozen until step {self.router.freeze_steps}")
        trainer.dashboard.log_record({"step": trainer.step, "lora_trainable": groups, "lora_total": total})
        if any(isinstance(m, MoE) for m in self.model.layers.modules()):
            with self._as_base():
                self.routing_before = self._routing(trainer)

    def on_finish(self, trainer: Trainer) -> None:
        if self.routing_before is None:
            return
        layer_ids, before = self.routing_before
        _, after = self._routing(trainer)
        moe = trainer.config.model.moe
        drift = routing_drift(layer_ids, before, after, moe.experts_per_token, moe.collapse_share)
        trainer.dashboard.log_record({"step": trainer.step, "routing_drift": drift})
        png = write_load_heatmaps(
            trainer.run_dir / "routing_drift.png",
            layer_ids,
            [("base: expert load / mean load", before), ("fine-tuned: expert load / mean load", after)],
        )
        say = trainer.dashboard.message
        for row in drift["layers"]:
            say(
                f"routing layer {row['layer']}: KL vs base {row['kl_vs_base']:.4f} nats, load entropy "
                f"{row['entropy_base']:.3f} -> {row['entropy']:.3f}, dead experts {len(row['dead_experts_base'])} -> "
                f"{len(row['dead_experts'])}"
            )
        if drift["collapsed"]:
            say(
                f"warning: routing collapsed in layer(s) {', '.join(map(str, drift['collapsed']))}: one expert "
                f"takes >= {100 * moe.collapse_share:.0f}% of the tokens (it did not in the base); raise "
                "--router-aux-loss-coef or --router-freeze-steps"
            )
        say(f"routing before/after: {png} (drift in metrics.jsonl)")


def _sidecar(folder: Path) -> dict[str, Any]:
    sidecar = read_sidecar(folder)
    if sidecar is None:
        raise DarkhorseError(f"{folder} is not a LoRA checkpoint (no {SIDECAR_FILE})")
    return sidecar


def _spec(sidecar: dict[str, Any]) -> LoRASpec:
    return LoRASpec(**{**sidecar["lora"], "targets": tuple(sidecar["lora"]["targets"])})


def resume_settings(out_dir: str | Path, resume: bool | Path = True) -> tuple[LoRASpec, RouterOptions, str]:
    """The LoRA spec, router options and base dtype of the run a `--resume` continues."""
    sidecar = _sidecar(find_resume_checkpoint(Path(out_dir), resume))
    return _spec(sidecar), RouterOptions(**sidecar["router"]), sidecar["base_dtype"]


def _refuse_changes(run: dict[str, Any], given: dict[str, Any]) -> None:
    """A resumed run keeps its LoRA and router settings: a different value given for one is refused."""
    changed = [f"{FLAGS[k]} {given[k]!r} (the run has {run[k]!r})" for k in given if given[k] != run[k]]
    if changed:
        raise DarkhorseError(
            f"--resume continues with the run's own LoRA and router settings; {', '.join(changed)}: "
            "drop the flag, or start a new run (another --out, or --force)"
        )


@torch.no_grad()
def _load_adapter_state(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    """The adapters and selection biases trainer_state.pt holds, into a model with LoRA applied."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, tensor in state.items():
        own[name].copy_(tensor)


def check_lora_setup(config: RunConfig, spec: LoRASpec, router: RouterOptions, base_dtype: str) -> LoRASpec:
    """Every refusal that needs only the model's shape, on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = Transformer(config.model)
    spec = spec.for_model(model)
    apply_lora(model, spec)
    check_representable(model, config.model, spec, router.bias_update)
    peft_targets(model, config.model, router.bias_update)
    moe = config.model.ffn == "moe"
    if keeps_updating_bias(config.model, router.bias_update) and "router" not in spec.targets:
        raise DarkhorseError(
            "this base's auxiliary-loss-free selection bias keeps updating, and only a targeted router saves it "
            "in the adapter: add router to --lora-targets, or pass --no-bias-update"
        )
    if not moe and (router.has_losses or router.freeze_steps):
        raise DarkhorseError("the router options need an MoE base; this one is dense")
    if router.freeze_steps and spec.targets == ("router",):
        raise DarkhorseError("--router-freeze-steps with only the router targeted: nothing would train at first")
    if base_dtype not in ("fp32", "bf16"):
        raise DarkhorseError(f"--base-dtype must be fp32 or bf16, got {base_dtype}")
    if base_dtype == "bf16" and config.train.dtype != "bf16":
        raise DarkhorseError("--base-dtype bf16 needs train.dtype=bf16 (autocast) as well")
    return spec


def finetune(
    base: str | Path | None,
    data: list[str],
    out_dir: str | Path,
    *,
    spec: LoRASpec | None = None,
    router: RouterOptions | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    resume: bool | Path | None = None,
    force: bool = False,
    base_dtype: str | None = None,
    skip_bad: bool = False,
    logger: str | None = None,
    verbose: bool = True,
    live: bool | None = None,
) -> TrainResult:
    """LoRA-fine-tune `base` on `data` (`PATH[:WEIGHT]` items: raw chat/text files or prepared dirs)
    into `out_dir`. `overrides` are train.* `key=value` settings. `resume` continues a run with its
    own base (`base` may name where it is now; its weights must be the same), LoRA and router settings
    (a `spec`, `router` or `base_dtype` that differs is refused) and its data when `data` is empty.
    `skip_bad` skips malformed records of raw data files."""
    out_dir = Path(out_dir)
    if any(item.strip().startswith("model.") for item in overrides):
        raise DarkhorseError("the model comes from --base; only train.* settings apply")
    resumed = None
    if resume:
        if force:
            raise DarkhorseError("--resume and --force contradict each other: choose one")
        found = find_resume_checkpoint(out_dir, resume)
        sidecar = _sidecar(found)
        run_spec, run_router = _spec(sidecar), RouterOptions(**sidecar["router"])
        given = {"base_dtype": base_dtype} if base_dtype is not None else {}
        if spec is not None:
            given.update(dataclasses.asdict(replace(spec, targets=spec.targets or run_spec.targets)))
        if router is not None:
            given.update(dataclasses.asdict(router))
        run = {**dataclasses.asdict(run_spec), **dataclasses.asdict(run_router), "base_dtype": sidecar["base_dtype"]}
        _refuse_changes(run, given)
        spec, router, base_dtype = run_spec, run_router, sidecar["base_dtype"]
        base = base or sidecar["base"]["path"]
        resumed = (found, sidecar["base"])
        config = load_run_config(overrides=list(overrides), base=ckpt.read_meta(found)["config"])
    elif base is None:
        raise DarkhorseError("finetune needs --base BASE (a darkhorse checkpoint or a Hugging Face directory)")
    elif not data:
        raise DarkhorseError("finetune needs --data PATH[:WEIGHT] (chat .jsonl files or prepared dirs)")
    spec, router, base_dtype = spec or LoRASpec(), router or RouterOptions(), base_dtype or "fp32"
    with claimed_run_dir(out_dir), tempfile.TemporaryDirectory(prefix="darkhorse-base-") as scratch:
        resolved = resolve_base(base, Path(scratch))
        if not resume:
            meta = ckpt.read_meta(resolved.checkpoint)
            base_config = run_config_from_dict(meta["config"])
            train = {**meta["config"]["train"], **TRAIN_DEFAULTS}
            model = base_config.model
            if not router.bias_update and model.ffn == "moe":
                model = dataclasses.replace(model, moe=dataclasses.replace(model.moe, bias_update_rate=0.0))
            config = load_run_config(
                overrides=list(overrides),
                base={
                    "name": f"lora-{resolved.given.resolve().name}",
                    "model": dataclasses.asdict(model),
                    "train": train,
                },
            )
        spec = check_lora_setup(config, spec, router, base_dtype)
        tokenizer = Tokenizer.from_file(resolved.checkpoint / ckpt.TOKENIZER_FILE)
        sources = prepare_for_base(data, tokenizer, progress=verbose, skip_bad=skip_bad)
        plan = plan_run(
            config, sources, out_dir, resume, init_from=None if resume else resolved.checkpoint, force=force
        )
        plan.config = dataclasses.replace(plan.config, model=config.model)  # init_from took the base's own model
        hooks = LoRAHooks(resolved, spec, router, base_dtype=base_dtype, resumed=resumed)
        return Trainer(plan, logger=logger, verbose=verbose, live=live, hooks=hooks).run()


def load_adapted_model(adapter_dir: str | Path, base: str | Path | None = None) -> tuple[Transformer, RunConfig]:
    """darkhorse's base + adapter model of a LoRA checkpoint (eval mode, fp32 CPU): the base named in
    its darkhorse_adapter.json (or `base`), checked by weight fingerprint, with the adapters and the
    run's selection biases from its trainer_state.pt."""
    adapter_dir = Path(adapter_dir)
    sidecar = _sidecar(adapter_dir)
    config = run_config_from_dict(sidecar["config"])
    spec = _spec(sidecar)
    with tempfile.TemporaryDirectory(prefix="darkhorse-base-") as scratch:
        resolved = resolve_base(base or sidecar["base"]["path"], Path(scratch))
        model = Transformer(config.model)
        ckpt.load_weights(model, resolved.checkpoint)
    check_base(adapter_dir, sidecar["base"], resolved.given, ckpt.weights_fingerprint(model), "load it on")
    apply_lora(model, spec)
    _load_adapter_state(model, ckpt.load_trainer_state(adapter_dir)["adapter"])
    return model.eval(), config
