"""The one training loop: any `Transformer` config, prepared data in, resumable checkpoints out.

A step is `grad_accum` micro-batches under autocast, one clip, one optimizer step per optimizer,
one scheduler step each, then the model's `after_optimizer_step` hook. Everything a step depends
on (weights, optimizer and scheduler state, RNG, data position) is in the checkpoint and the
batches are a pure function of (seed, step, micro-step), so a resumed run repeats the
uninterrupted one exactly on CPU. The loop knows nothing about the architecture: models report
their own loss terms (`out.losses`) and metrics (`training_metrics()`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from darkhorse import checkpoint as ckpt
from darkhorse.config import RunConfig
from darkhorse.data.loader import WindowLoader
from darkhorse.data.prepare import default_cache_dir
from darkhorse.errors import DarkhorseError
from darkhorse.model import Transformer
from darkhorse.model.kernels import resolve_kernels, use_kernels
from darkhorse.model.transformer import SIDE_HEADS
from darkhorse.train.dashboard import Dashboard, ExternalLogger
from darkhorse.train.device import memory_in_use, out_of_memory_as_advice, resolve_device
from darkhorse.train.distributed import (
    any_rank,
    average,
    barrier,
    collective_errors,
    init_world,
    per_rank_batch,
    shutdown,
    token_weight,
)
from darkhorse.train.evaluate import evaluate
from darkhorse.train.expert_parallel import (
    average_expert_gradients,
    clip_gradients,
    expert_parameters,
    gather_optimizer_state,
    gathered_experts,
    slice_optimizer_state,
)
from darkhorse.train.memory import GIB, available_memory, estimate_training_memory, fit_warning
from darkhorse.train.optim import build_optimizers, split_parameters
from darkhorse.train.parallel import (
    average_gradients,
    check_parallel_config,
    full_norm,
    gradient_sync,
    parallelize,
    reduce_expert_load,
)
from darkhorse.train.peak_flops import peak_flops
from darkhorse.train.plan import Layout, plan_layout
from darkhorse.train.reports import write_run_reports
from darkhorse.train.routing import RoutingCounter, held_out_isolation, isolated_partition, isolation_lines
from darkhorse.train.run_dir import RunPlan, claimed_run_dir, plan_run, read_history
from darkhorse.train.schedule import budget_share, build_schedulers, lr_multiplier

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLE_PROMPT_TOKENS = 8
SAMPLE_NEW_TOKENS = 32
SPEED_PROBE_STEPS = 3  # steps timed before judging whether the run would take days
SLOW_RUN_SECONDS = 86400


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens_seen: int
    checkpoint: Path | None  # final/ after a full run, the interrupt checkpoint otherwise
    interrupted: bool = False
    stopped_by: str | None = None  # the signal that interrupted it (SIGINT, SIGTERM)
    last_loss: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    bad_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class _StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals only reach the main thread; a worker thread trains without them
            return
        previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class TrainingHooks:
    """What a kind of training changes in the one loop (the default: every weight, full checkpoints).

    Fine-tuning (darkhorse.finetune) subclasses it: it loads a base and adds adapters before the
    optimizers are built (only parameters that require grad enter them), switches groups on and off
    per step, adds loss terms, and saves only what it trains."""

    command = "darkhorse train"  # what the interrupt message tells the user to resume with
    sized_by_plan = True  # every weight trains: train/plan.py sizes the run before the model is built

    def load_weights(self, model: Transformer, plan: RunPlan, device: torch.device) -> None:
        weights_from = plan.resume_from or plan.init_from
        if weights_from:
            ckpt.load_weights(model, weights_from, device)

    def before_step(self, trainer: Trainer) -> None:
        """Called before each optimizer step's first micro-batch (`trainer.step` is the step to run)."""

    def loss_terms(self) -> dict[str, torch.Tensor]:
        """Extra terms to add to the last forward's loss (logged as `<name>_loss`)."""
        return {}

    def replicated_parameters(self, model: Transformer) -> list[torch.nn.Parameter]:
        """Parameters every rank keeps whole under FSDP (adapters on a sharded frozen base), so
        `state` and `save` can read them as in one process."""
        return []

    def state(self) -> dict[str, Any]:
        """Extra entries for trainer_state.pt."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what `state` saved (called on resume after the trainer's own state)."""

    def save(self, trainer: Trainer, folder: Path, meta: dict[str, Any], state: dict[str, Any]) -> Path:
        return ckpt.save_training_checkpoint(folder, trainer.model, trainer.config, trainer.tokenizer_file, meta, state)

    def on_start(self, trainer: Trainer) -> None:
        """After the run's announcement, before the first step."""

    def on_finish(self, trainer: Trainer) -> None:
        """After final/ is saved and the run reports are written."""


class Trainer:
    """One run, set up from a `RunPlan` (a fresh start or a checkpoint); `run()` trains until
    max_steps, the time budget (train.minutes) or a signal. `train()` plans and runs in one call;
    `hooks` change what is trained and saved (see `TrainingHooks`); `clock` (seconds) times the
    budget, so a test can drive it."""

    def __init__(
        self,
        plan: RunPlan,
        *,
        logger: str | None = None,
        verbose: bool = True,
        live: bool | None = None,
        hooks: TrainingHooks | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hooks = hooks or TrainingHooks()
        self.clock = clock
        self.spent = 0.0  # seconds of training so far, over every resume (what a time budget counts)
        self.run_dir, self.sources = plan.run_dir, plan.sources
        self.init_from, self.resumed_from = plan.init_from, plan.resume_from
        self.origin, self.origin_step = plan.origin, plan.origin_step
        self.device = resolve_device(plan.config.train.device)
        self.world = init_world(plan.config.train, self.device)
        if self.device.type == "cuda" and self.world.launched:
            self.device = torch.device("cuda", self.world.local_rank)
        self.config = self._fit_to_world(plan)
        self.train_cfg = self.config.train
        check_parallel_config(self.config, self.world)
        first = self.sources[0][0]
        self.tokenizer_file = first.tokenizer_path if first.tokenizer_path.exists() else None
        # UTF-8 bytes per token id, for exact val bits per byte (masked chat data included)
        self.token_bytes = None
        if self.tokenizer_file is not None:
            from darkhorse.data.tokenizer import Tokenizer
            from darkhorse.eval.perplexity import token_byte_lengths

            self.token_bytes = token_byte_lengths(Tokenizer.from_file(self.tokenizer_file)).to(self.device)

        if self.hooks.sized_by_plan:  # said before the model is built: building it may be what fails
            warning = self._check_plan()
            if warning and verbose and self.world.is_main:
                print(f"warning: {warning}", flush=True)
        if self.config.model.moe.domain_routing == "isolated" and verbose and self.world.is_main:
            print(isolated_partition(self.config.model.moe, first.domain_names), flush=True)
        torch.manual_seed(self.train_cfg.seed)
        with out_of_memory_as_advice(self.config, self.device), torch.device(self.device):
            self.model = Transformer(self.config.model)
        if not (plan.resume_from and ckpt.is_sharded(plan.resume_from)):  # shards load with the optimizer state
            self.hooks.load_weights(self.model, plan, self.device)
        self.model.gradient_checkpointing = self.train_cfg.grad_checkpointing
        self.kernels = resolve_kernels(self.train_cfg.kernels, self.device)
        use_kernels(self.model, self.kernels)
        self.model.train()
        fsdp = self.train_cfg.parallel == "fsdp"
        # under FSDP adapters stay whole on every rank over the sharded frozen base; checkpoints are shards
        # only when everything is sharded
        self.replicated = self.hooks.replicated_parameters(self.model) if fsdp else []
        self.sharded = fsdp and not self.replicated
        if self.sharded and type(self.hooks).save is not TrainingHooks.save:
            raise DarkhorseError(
                f"train.parallel=fsdp: `{self.hooks.command}` saves its own checkpoint format, which sharded "
                "training does not write; use train.parallel=ddp"
            )
        self.wrapped = parallelize(self.model, self.train_cfg, self.world, self.replicated)  # or the model itself
        compile = self.train_cfg.compile
        self.compiled = self.device.type == "cuda" if compile == "auto" else bool(compile)
        self.forward = torch.compile(self.wrapped) if self.compiled else self.wrapped
        self.experts = expert_parameters(self.model)  # this rank's own part of the experts (expert parallelism)
        self.routing = RoutingCounter(self.model, training_only=True)  # for the end-of-run reports

        self.optimizers = build_optimizers(self.model, self.train_cfg, self.device)
        self.schedulers = build_schedulers(self.optimizers, self.train_cfg, self._spent)
        self.lr_multiplier = lr_multiplier(self.train_cfg, self._spent)
        fp16 = self.train_cfg.dtype == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.autocast_dtype = AUTOCAST_DTYPES.get(self.train_cfg.dtype)

        self.loader = WindowLoader(
            self.sources,
            seq_len=self.train_cfg.seq_len,
            batch_size=self.train_cfg.batch_size,
            grad_accum=self.train_cfg.grad_accum,
            seed=self.train_cfg.seed,
            loss_mask=self.train_cfg.loss_mask,
            align=self.train_cfg.align_windows,
            device=self.device,
            rank=self.world.rank,
            world_size=self.world.size,
            batch_warmup_steps=self.train_cfg.batch_warmup_steps,
            seq_warmup_steps=self.train_cfg.seq_warmup_steps,
            source_steps=self.train_cfg.source_steps,
        )
        warmed_up = max(self.train_cfg.batch_warmup_steps, self.train_cfg.seq_warmup_steps)
        self.tokens_per_step = self.loader.tokens_per_step(warmed_up)  # a full step's, after any warm-up
        self.step = self.tokens_seen = self.bad_in_a_row = self.bad_total = 0
        self.history: list[dict[str, Any]] = []
        if plan.resume_from:
            self._load_trainer_state(plan.resume_from)
            self.history = read_history(self.run_dir, self.step) if self.world.is_main else []  # rank 0 rewrites it
        self.val_batches = self.loader.val_batches(self.train_cfg.eval_steps) if self.train_cfg.eval_steps else []
        self.flops_per_token = self.model.flops_per_token(self.train_cfg.seq_len)
        main = self.world.is_main
        self.external_logger = ExternalLogger(logger, self.run_dir, self.config.to_dict()) if logger and main else None
        self.dashboard = Dashboard(
            self.run_dir,
            max_steps=self.train_cfg.max_steps,
            start_step=self.step,
            budget_s=self.train_cfg.minutes * 60,
            min_steps=self.train_cfg.min_steps,
            train_tokens=self.loader.train_tokens,
            verbose=verbose and main,
            live=live,
            logger=self.external_logger,
            history=self.history,
            record=main,
            log_file=self.run_dir / "logs" / f"rank-{self.world.rank}.log" if self.world.launched else None,
        )
        self._tokenizer = None

    # -- state ----------------------------------------------------------------------------------

    def _spent(self) -> float:
        return self.spent

    def _seconds_since(self, start: float) -> float:
        """One reading of the clock per step; under a time budget with several ranks, their mean, so
        that all of them stop after the same step."""
        seconds = self.clock() - start
        if self.world.size > 1 and self.train_cfg.minutes:
            seconds = average(self.world, torch.tensor(seconds, dtype=torch.float64, device=self.device)).item()
        return seconds

    def finished(self) -> bool:
        """Whether the run is over: max_steps reached (0: no cap) or its time budget spent (and its
        min_steps taken)."""
        cfg = self.train_cfg
        out_of_steps = cfg.max_steps > 0 and self.step >= cfg.max_steps
        return out_of_steps or (cfg.minutes > 0 and budget_share(self.spent, self.step, cfg) >= 1.0)

    def _fit_to_world(self, plan: RunPlan) -> RunConfig:
        """The run's config, with the micro-batch per rank that keeps a resumed run's global batch
        when it resumes on another number of ranks (batches are cut from the same windows)."""
        config = plan.config
        if not plan.resume_from:
            return config
        saved_world = int(ckpt.read_meta(plan.resume_from).get("world_size", 1))
        if saved_world == self.world.size:
            return config
        batch_size = per_rank_batch(config.train.batch_size, saved_world, self.world.size)
        return dataclasses.replace(config, train=dataclasses.replace(config.train, batch_size=batch_size))

    def _check_plan(self) -> str | None:
        """Size this run per device before building it: refuse one that needs over twice the free
        memory, return a warning for one that likely does not fit."""
        plan = plan_layout(
            self.config, Layout(self.world.size, self.train_cfg.parallel, self.train_cfg.expert_parallel)
        )
        available = available_memory(self.device)
        if available is not None and plan.total > 2 * available:
            raise DarkhorseError(
                f"this run needs about {plan.total / GIB:,.1f} GiB per device (weights, gradients and optimizer "
                f"{(plan.weights + plan.grads + plan.optimizer) / GIB:,.1f}, "
                f"activations {plan.activations / GIB:,.1f}) "
                f"but {self.device} has {available / GIB:,.1f} GiB free; shard it over more devices "
                "(`darkhorse params --world-size N --parallel fsdp` sizes a layout) or pick a smaller preset"
            )
        return fit_warning(plan.estimate(), available)

    def _trainer_state(self) -> dict[str, Any]:
        return {
            # a sharded checkpoint keeps the optimizer state with the weights, in its shards
            "optimizers": [] if self.sharded else [self._whole_state(optimizer) for optimizer in self.optimizers],
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.capture_rng_state(),
            "step": self.step,  # the data position too: batches are a function of (seed, step)
            "tokens_seen": self.tokens_seen,
            "spent_seconds": self.spent,  # a time budget goes on from here on resume
            "bad_in_a_row": self.bad_in_a_row,
            "bad_total": self.bad_total,
            **self.hooks.state(),
        }

    def _whole_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state as one process holds it (expert moments gathered from every rank)."""
        if not self.experts:
            return optimizer.state_dict()
        return gather_optimizer_state(optimizer, optimizer.state_dict(), self.experts, self.world.size)

    def _load_trainer_state(self, folder: Path) -> None:
        state = ckpt.load_trainer_state(folder)
        if ckpt.is_sharded(folder):
            from darkhorse.train.sharded import load_sharded_checkpoint  # DCP's import is ~1 s: FSDP runs only

            load_sharded_checkpoint(folder, self.model, self.optimizers)
        elif len(state["optimizers"]) != len(self.optimizers):
            raise DarkhorseError(f"{folder}: optimizer state does not match train.optimizer; cannot resume")
        else:
            for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
                if self.experts:
                    saved = slice_optimizer_state(optimizer, saved, self.experts, self.world.rank, self.world.size)
                optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_state(state["rng"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.spent = float(state.get("spent_seconds", 0.0))  # checkpoints from before time budgets lack it
        self.bad_in_a_row, self.bad_total = int(state["bad_in_a_row"]), int(state["bad_total"])
        self.hooks.load_state(state)
        self.model.after_optimizer_step(self.step)  # step-driven schedules (the group loss warm-up) go on from here

    def _diverged(self) -> str | None:
        """Why the model as it stands is unusable (its last loss, or a weight, not finite), or None."""
        if self.bad_in_a_row:
            return f"the loss at step {self.step} is not finite"
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"{name} holds NaN or inf"
        return None

    def save(self, folder: Path, loss: float | None) -> Path | None:
        """Save a checkpoint into `folder` and prune old ones; None (nothing saved) if the model has
        diverged: a non-finite model never gets a valid checkpoint name."""
        reason = self._diverged()
        # every rank must agree: expert parallelism gives each rank other weights, and a rank that skips
        # the save skips its collectives too
        if any_rank(self.world, reason is not None):
            reason = reason or "another rank's experts hold NaN or inf"
            self.dashboard.message(f"warning: not saving {folder.name}: {reason}")
            return None
        meta = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loss": loss,
            "tokenizer_sha256": self.sources[0][0].tokenizer_sha256,
            "data": [{"path": str(data.path.resolve()), "weight": weight} for data, weight in self.sources],
            "world_size": self.world.size,
        }
        if self.config.model.moe.domain_routing == "isolated":  # names the groups for `export --domains`
            meta["domains"] = self.sources[0][0].domain_names
        if self.origin:
            meta["init_from"] = self.origin
        state, saved = self._trainer_state(), Path(folder)
        if self.sharded:
            from darkhorse.train.sharded import save_sharded_checkpoint  # DCP's import is ~1 s: FSDP runs only

            args = (self.model, self.optimizers, self.config, self.tokenizer_file, meta, state, self.world)
            saved = save_sharded_checkpoint(folder, *args)
        else:
            with gathered_experts(self.model):  # every rank holds the same weights now: one writes them
                if self.world.is_main:
                    saved = self.hooks.save(self, folder, meta, state)
        barrier(self.world)
        if self.world.is_main:
            ckpt.prune_checkpoints(self.run_dir, self.train_cfg.keep_last)
        return saved

    # -- one step -------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def train_step(self) -> tuple[float, dict[str, float], torch.Tensor | None]:
        """Run one optimizer step; returns (loss, named loss terms, grad norm or None if skipped)."""
        accum = self.train_cfg.grad_accum
        total = torch.zeros((), device=self.device)
        terms: dict[str, torch.Tensor] = {}
        self.hooks.before_step(self)
        for micro_step in range(accum):
            batch = self.loader.batch(self.step, micro_step)
            weight = token_weight(self.world, batch.targets)  # 1 in one process
            with gradient_sync(self.wrapped, micro_step == accum - 1):  # ranks sync on the last micro-batch only
                with self._autocast():
                    out = self.forward(
                        batch.inputs,
                        batch.targets,
                        domains=batch.domains,
                        mtp_weight=self.train_cfg.mtp_weight,
                        return_logits=False,  # the fused head loss: no [tokens, vocab] logits
                    )
                    out_loss = out.loss
                    for name, term in self.hooks.loss_terms().items():
                        out_loss = out_loss + term
                        out.losses[name] = term.detach()
                    out_loss = out_loss * weight
                self.scaler.scale(out_loss / accum).backward()
            total += out_loss.detach()
            for name, value in out.losses.items():
                terms[name] = terms.get(name, 0) + value.detach().float() * weight / accum
        average_expert_gradients(self.model, self.world.size if self.experts else 1)
        average_gradients(self.replicated, self.world)
        # the logged loss and terms are means over all ranks, so every rank agrees on skipping a step
        means = average(self.world, torch.stack([total / accum, *terms.values()]).float())
        terms = dict(zip(terms, means[1:], strict=True))
        loss = means[0].item()
        if not math.isfinite(loss):
            self._zero_grad()
            return loss, {}, None
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        params: list[torch.nn.Parameter] = []
        side_heads: list[torch.nn.Parameter] = []  # clipped apart: their gradients must not scale the model's
        for name, param in self.model.named_parameters():
            if param.grad is not None:
                (side_heads if name.endswith(SIDE_HEADS) else params).append(param)
        max_norm = self.train_cfg.grad_clip if self.train_cfg.grad_clip > 0 else float("inf")
        if side_heads:
            torch.nn.utils.clip_grad_norm_(side_heads, max_norm)
        if self.experts:
            grad_norm = clip_gradients(params, self.experts, max_norm)
        else:
            grad_norm = full_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        self._zero_grad()
        return loss, {name: float(value) for name, value in terms.items()}, grad_norm

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Val loss and bits per byte on the fixed val batches (see `train.evaluate`)."""
        metrics = evaluate(self.forward, self.val_batches, self.sources, self._autocast, self.token_bytes)
        return {"step": self.step, **metrics}

    def sample(self) -> str | None:
        """A short continuation of the first val window's opening, to see what the model learned."""
        if self.tokenizer_file is None or not self.val_batches or not self.world.is_main or self._diverged():
            return None
        if self.sharded or self.experts:  # decoding would need every rank in step
            return None
        from darkhorse.data.tokenizer import Tokenizer
        from darkhorse.infer.generate import generate_text
        from darkhorse.infer.sampling import SamplingOptions

        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_file(self.tokenizer_file)
        prompt = self._tokenizer.decode(self.val_batches[0].inputs[0, :SAMPLE_PROMPT_TOKENS].tolist())
        return generate_text(
            self.model,
            self._tokenizer,
            prompt,
            SamplingOptions(max_new_tokens=SAMPLE_NEW_TOKENS, temperature=0.8, top_k=50, seed=self.train_cfg.seed),
        )

    # -- the loop -------------------------------------------------------------------------------

    def _announce(self) -> None:
        cfg = self.train_cfg
        say = self.dashboard.message
        if self.resumed_from:
            say(f"resuming from {self.resumed_from} at step {self.step}")
        elif self.init_from:
            say(f"starting from the weights of {self.init_from} (its step {self.origin_step}); optimizer state is new")
        if self.world.launched:
            say(
                f"{self.world.size} ranks, train.parallel={cfg.parallel}: global batch {cfg.batch_size} x "
                f"{cfg.grad_accum} x {self.world.size} = {cfg.batch_size * cfg.grad_accum * self.world.size} windows; "
                f"each rank logs to {self.run_dir / 'logs'}"
            )
        length = f"{cfg.max_steps} steps"
        if cfg.minutes:
            limits = [f"at least {cfg.min_steps}"] if cfg.min_steps else []
            limits += [f"at most {cfg.max_steps}"] if cfg.max_steps else []
            length = f"{cfg.minutes:g} minutes" + (f" ({' and '.join(limits)} steps)" if limits else "")
        say(
            f"training {self.config.name or 'model'}: {self.model.num_params():,} parameters on {self.device} "
            f"({cfg.dtype}, {self.kernels} kernels{', compiled' if self.compiled else ''}), "
            f"{self.loader.train_tokens:,} train tokens, {self.tokens_per_step:,} tokens per step, "
            f"{length} -> {self.run_dir}"
        )
        cache = default_cache_dir().resolve()
        for data, _ in self.sources:
            if data.path.resolve().is_relative_to(cache):  # a raw --data file, prepared on the fly
                raw = ", ".join(entry["path"] for entry in data.meta.get("inputs", [])) or "the raw file"
                say(
                    f"data: {raw} is prepared in {data.path} "
                    "(reused while the file is unchanged; DARKHORSE_CACHE moves it)"
                )
        if not self.val_batches:
            say("no val split long enough for one window: evaluation is off")
        if not self.hooks.sized_by_plan and (warning := self._fit_warning(self.model)):
            say(f"warning: {warning}")

    def _fit_warning(self, model: Transformer) -> str | None:
        hidden = split_parameters(model)[0]
        estimate = estimate_training_memory(self.config, model.num_params(), sum(p.numel() for p in hidden))
        return fit_warning(estimate, available_memory(self.device))

    def _log_record(
        self, loss: float, terms: dict[str, float], grad_norm, lr_scale: float, elapsed: float, tokens: int
    ) -> dict[str, Any]:
        tokens_per_s = tokens / max(elapsed, 1e-9)
        peak = peak_flops(self.device, self.train_cfg.dtype)
        record: dict[str, Any] = {
            "step": self.step,
            "loss": loss,
            "lr": self.train_cfg.lr * lr_scale,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / peak,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_seen": self.tokens_seen,
            "epoch": self.tokens_seen / max(self.loader.train_tokens, 1),
            "memory_gib": memory_in_use(self.device),
            "bad_steps": self.bad_total,
        }
        if self.train_cfg.minutes:
            record["spent_s"] = self.spent
        if self.train_cfg.optimizer == "muon":
            record["muon_lr"] = self.train_cfg.muon_lr * lr_scale
        record.update({f"{name}_loss": value for name, value in terms.items()})
        record.update(self.model.training_metrics())
        return record

    def run(self) -> TrainResult:
        """Train; on failure with several ranks the process group is left standing: this rank may still
        have collectives in flight (DDP's gradient all-reduce) that peers blocked elsewhere never join,
        and destroying the group, or a normal interpreter exit, waits for them as they wait for us.
        The CLI (and tests/distributed/worker.py) then leave with `os._exit`, and torchrun stops the rest."""
        try:
            with collective_errors(self.world):
                result = self._run()
        except BaseException:
            if self.world.size == 1:
                self._leave_process_group()
            raise
        self._leave_process_group()
        return result

    def _leave_process_group(self) -> None:
        """Drop the DDP wrapper, then destroy the group. In this order: DDP's reducer holds the group,
        and when it drops the last reference the group's destructor joins gloo's worker threads with
        the GIL held, while a worker still releasing a finished collective's tensors waits for the GIL
        (a hang at exit, seen about once in 40 runs under load)."""
        if self.wrapped is not self.model:
            self.wrapped = self.forward = self.model
            gc.collect()
        shutdown(self.world)

    def _run(self) -> TrainResult:
        cfg = self.train_cfg
        stop = _StopRequest()
        loss: float | None = None
        last_eval: dict[str, Any] = {}
        saved: Path | None = None
        with stop.installed(), self.dashboard:
            self._announce()
            self.hooks.on_start(self)
            window_start, window_tokens = time.perf_counter(), 0
            run_start, stopping = window_start, False
            clock_start, spent_before = self.clock(), self.spent
            with out_of_memory_as_advice(self.config, self.device):
                # a signal may reach one rank only (or each at another step): all stop after the same step
                while not self.finished():
                    if stopping := any_rank(self.world, stop.signal_name is not None):
                        break
                    lr_scale = self.lr_multiplier(self.step)  # what the schedulers set for this step
                    loss, terms, grad_norm = self.train_step()
                    self.spent = spent_before + self._seconds_since(clock_start)
                    with warnings.catch_warnings():
                        # a skipped step (NaN loss, or fp16 overflow) still advances the schedule
                        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                        for scheduler in self.schedulers:
                            scheduler.step()
                    step_tokens = self.loader.tokens_per_step(self.step)
                    self.step += 1
                    self.tokens_seen += step_tokens
                    if self.compiled and self.step - self.dashboard.start_step == 1:
                        seconds = time.perf_counter() - run_start
                        self.dashboard.message(f"torch.compile warm-up: the first step took {seconds:.1f} s")
                    if self.step - self.dashboard.start_step == SPEED_PROBE_STEPS:
                        self._warn_if_slow(time.perf_counter() - run_start)
                    window_tokens += step_tokens
                    if grad_norm is None:
                        self._count_bad_step(loss)
                    else:
                        self.bad_in_a_row = 0
                        reduce_expert_load(self.model, self.world)  # one ALF bias step on every rank
                        self.model.after_optimizer_step(self.step)
                    last = self.finished()
                    if self.step % cfg.log_interval == 0 or last:
                        record = self._log_record(
                            loss, terms, grad_norm, lr_scale, time.perf_counter() - window_start, window_tokens
                        )
                        self.history.append(record)
                        self.dashboard.log_step(record)
                        window_start, window_tokens = time.perf_counter(), 0
                    if self.val_batches and cfg.eval_interval > 0 and (self.step % cfg.eval_interval == 0 or last):
                        last_eval = self.evaluate()
                        self.history.append(last_eval)
                        self.dashboard.log_eval(last_eval, self.sample())
                    if cfg.save_interval > 0 and self.step % cfg.save_interval == 0:
                        saved = self.save(self.run_dir / ckpt.step_name(self.step), loss) or saved

            interrupted = stopping and not self.finished()
            if interrupted:
                if self.step > 0 and (saved is None or saved.name != ckpt.step_name(self.step)):
                    saved = self.save(self.run_dir / ckpt.step_name(self.step), loss) or saved
                where = f"checkpoint {saved}" if saved else "nothing to save yet"
                self.dashboard.message(
                    f"stopped by {stop.signal_name or 'a signal to another rank'} at step {self.step} ({where}); "
                    "continue with: "
                    f"{self.hooks.command} --out {self.run_dir} --resume"
                )
            else:
                saved = self.save(self.run_dir / ckpt.FINAL_NAME, loss)
                if saved is None:
                    raise DarkhorseError(
                        f"the run diverged ({self._diverged()}), so no final/ was saved; "
                        "lower train.lr or raise train.warmup_steps"
                    )
                # domain ids are names only where every source has the same domains (the loader numbers
                # them as the first source does)
                domain_sets = {frozenset(data.domain_names) for data, _ in self.sources}
                domain_names = self.sources[0][0].domain_names if len(domain_sets) == 1 else None
                reports, held_out = [], None
                # a sharded or expert-parallel model forwards on all ranks in step, or not at all
                in_step = self.train_cfg.parallel == "fsdp" or bool(self.experts)
                if self.world.is_main or self.experts:
                    held_out = self._held_out_isolation(domain_names)
                if self.world.is_main:  # rank 0's routing counts stand for the run's
                    reports = write_run_reports(self.run_dir, self.history, self.routing, domain_names, held_out)
                if self.world.is_main or in_step:
                    self.hooks.on_finish(self)
                self.dashboard.message(f"done: {saved}")
                if reports:
                    self.dashboard.message(f"reports in {self.run_dir}: {', '.join(p.name for p in reports)}")
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            tokens_seen=self.tokens_seen,
            checkpoint=saved,
            interrupted=interrupted,
            stopped_by=stop.signal_name if interrupted else None,
            last_loss=loss,
            val_loss=last_eval.get("val_loss"),
            val_bpb=last_eval.get("val_bpb"),
            bad_steps=self.bad_total,
            history=self.history,
        )

    def _held_out_isolation(self, domain_names: list[str] | None) -> dict[str, Any] | None:
        """Routing on the first source's validation text with its tags withheld (MoE, tagged data, whole
        model on this rank), each document in training-length rows sliding by half a row (no context lost
        to a row restart), said per layer; None otherwise."""
        data = self.sources[0][0]
        val_domains = data.domains("val")
        if not (domain_names and self.routing.layers and val_domains is not None) or self.sharded:
            return None
        bos_id = None
        if self.tokenizer_file is not None:
            from darkhorse.data.tokenizer import Tokenizer

            bos_id = Tokenizer.from_file(self.tokenizer_file).bos_id
        tokens = torch.from_numpy(data.tokens("val").astype("int64"))
        domains = torch.from_numpy(val_domains.astype("int64"))
        with self._autocast():
            seq_len = self.train_cfg.seq_len
            report = held_out_isolation(
                self.model, tokens, domains, seq_len, bos_id, domain_names, stride=max(1, seq_len // 2)
            )
        for line in isolation_lines(report):
            self.dashboard.message(line)
        return report

    def _warn_if_slow(self, elapsed: float) -> None:
        """Say so when the first steps' speed puts the end of the run more than a day away."""
        if self.train_cfg.minutes:  # the budget says when it ends
            return
        remaining = self.train_cfg.max_steps - self.step
        eta = elapsed / SPEED_PROBE_STEPS * remaining
        if eta > SLOW_RUN_SECONDS:
            tokens_per_s = SPEED_PROBE_STEPS * self.tokens_per_step / max(elapsed, 1e-9)
            self.dashboard.message(
                f"warning: at {tokens_per_s:,.0f} tokens/s (the first {SPEED_PROBE_STEPS} steps) the remaining "
                f"{remaining:,} steps take about {eta / 86400:,.1f} days on {self.device}; a smaller preset, "
                "fewer train.max_steps or more devices (`darkhorse params --world-size N`) shorten it"
            )

    def _count_bad_step(self, loss: float) -> None:
        self.bad_in_a_row += 1
        self.bad_total += 1
        self.dashboard.message(f"warning: step {self.step} loss is {loss}; skipped it (no update)")
        if self.bad_in_a_row >= self.train_cfg.max_bad_steps:
            raise DarkhorseError(
                f"stopping: {self.bad_in_a_row} non-finite losses in a row (train.max_bad_steps) at step "
                f"{self.step}; lower train.lr, raise train.warmup_steps, use train.dtype=bf16 instead of fp16, "
                "or check the data"
            )


def train(
    config: RunConfig,
    data: list[tuple[Path, float]],
    out_dir: str | Path,
    resume: bool | Path | None = None,
    *,
    init_from: str | Path | None = None,
    force: bool = False,
    logger: str | None = None,
    verbose: bool = True,
    live: bool | None = None,
) -> TrainResult:
    """Train `config` on `data` ((prepared dir or raw file, weight) pairs) into `out_dir`.

    `resume=True` continues from the newest checkpoint in `out_dir`, a path from that checkpoint
    (with `data` empty, the run's own sources are reused). `init_from` starts from a checkpoint's
    model config and weights (e.g. an imported one) with fresh optimizer state at step 0; `config`
    then only supplies the train section. `force` starts over in a run dir that holds a run.
    `logger` also logs to "tensorboard" or "wandb"; `verbose=False` prints nothing; `live` forces
    the rich view on or off (default: on when stdout is a terminal).
    """
    with claimed_run_dir(out_dir):
        plan = plan_run(config, data, out_dir, resume, init_from=init_from, force=force)
        return Trainer(plan, logger=logger, verbose=verbose, live=live).run()
