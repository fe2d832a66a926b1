"""Training throughput: darkhorse's trainer vs. transformers' LlamaForCausalLM, same run, same batches.

For each preset and dtype, both models are built from one config (same dims, GQA, tied
embeddings, no biases, RoPE theta), trained with fused AdamW on the same batches from our loader,
with the same clipping and autocast. Steps alternate between the two models so that load on a
shared machine hits both alike; the median step time gives tokens/s, and their ratio is the
figure to watch (goal: darkhorse >= 1.2x). MFU uses our FLOPs-per-token and the device's peak
(on CPU a measured matmul peak at the training dtype).

Genesis presets (MLA attention, MoE FFN) race transformers' `DeepseekV3ForCausalLM` of the same
shape instead (bench_moe's twin; MTP off, as transformers has none). `--compile` adds a row per
preset in which darkhorse runs with train.compile=true against transformers both eager and under
torch.compile, and reports each compiled model's warm-up (its first step, compilation included).
`--clock cpu` times steps in process CPU time, which a loaded machine disturbs far less than wall
time; it only means tokens/s with --threads 1 (more threads add their spin-waits to it).
`--device cuda` trains both on the GPU (each step ends with a device synchronisation, so its time
is the whole step's). Gradient checkpointing is off for both, as transformers' twin has none.
`--profile FILE` appends torch.profiler's operator table of two more steps of each model.
`--kernels torch liger` adds a row per train.kernels value (liger: fused CUDA kernels, issue 18);
`--ours-only` times darkhorse alone (its MFU, no transformers twin to build, compile and wait for).

    .venv/bin/python bench/bench_train.py --presets tiny-cpu d20 --dtypes fp32 bf16
    .venv/bin/python bench/bench_train.py --presets tiny-cpu --dtypes fp32 --threads 1 --clock cpu --compile
    python bench/bench_train.py --device cuda --presets genesis-1b --dtypes bf16 --batch-size 8 --seq-len 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_moe import hf_config
from transformers import AutoModelForCausalLM, PreTrainedModel

from darkhorse.config import RunConfig, load_run_config
from darkhorse.train.peak_flops import peak_flops
from darkhorse.train.run_dir import plan_run
from darkhorse.train.trainer import Trainer


def write_random_prepared(folder: Path, vocab_size: int, tokens: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.random.default_rng(0).integers(0, vocab_size, size=tokens).astype("<u4")
    ids.tofile(folder / "train.bin")
    meta = {"vocab_size": vocab_size, "tokenizer_sha256": "bench", "splits": {"train": {"tokens": tokens}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def hf_twin(config: RunConfig, experts: str = "eager") -> PreTrainedModel:
    """transformers' model with exactly our model's shape: DeepseekV3 for Genesis (with the `experts`
    implementation), else Llama."""
    extra = {"experts_implementation": experts} if config.model.ffn == "moe" else {}
    return AutoModelForCausalLM.from_config(hf_config(config.model, **extra))


def bench(
    preset: str,
    dtype: str,
    batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int,
    work: Path,
    *,
    compile: bool = False,
    clock: Callable[[], float] = time.perf_counter,
    device: str = "cpu",
    hf_experts: str = "eager",
    profile: Path | None = None,
    kernels: str = "auto",
    ours_only: bool = False,
) -> dict:
    overrides = [
        f"train.dtype={dtype}", f"train.batch_size={batch_size}", f"train.seq_len={seq_len}", "model.mtp_depth=0",
        "train.recipe=classic", "train.optimizer=adamw", "train.grad_accum=1", "train.eval_steps=0",
        f"train.max_steps={steps + warmup}",
        f"train.compile={str(compile).lower()}", f"train.device={device}", "train.grad_checkpointing=false",
        f"train.kernels={kernels}",
    ]  # fmt: skip
    config = load_run_config(preset, overrides=overrides)
    tokens_needed = 2 * (steps + warmup) * batch_size * (seq_len + 1)
    data = write_random_prepared(work / f"{preset}-data", config.model.vocab_size, max(200_000, tokens_needed))
    ours = Trainer(plan_run(config, [(data, 1.0)], work / f"{preset}-{dtype}-run", force=True), verbose=False)
    if ours.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ours.device)

    contenders = {"darkhorse": lambda step: ours.train_step()}
    if not ours_only:
        contenders.update(hf_contenders(ours, config, hf_experts, compile))
    timings: dict[str, list[float]] = {name: [] for name in contenders}
    first_step: dict[str, float] = {}

    def synchronize() -> None:
        if ours.device.type == "cuda":
            torch.cuda.synchronize(ours.device)

    for step in range(warmup + steps):
        for name, run_step in contenders.items():
            synchronize()
            start, wall_start = clock(), time.perf_counter()
            run_step(step)
            synchronize()
            timings[name].append(clock() - start)
            first_step.setdefault(name, time.perf_counter() - wall_start)  # wall: compilation runs in workers
    if profile is not None:
        write_profile(profile, contenders, ours.device, f"{preset} {dtype} {batch_size}x{seq_len}", synchronize)

    tokens = batch_size * seq_len
    peak = peak_flops(ours.device, dtype)
    result = {"preset": preset, "dtype": dtype, "batch": batch_size, "seq_len": seq_len, "steps": steps}
    result["kernels"] = ours.kernels
    if ours.device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(ours.device) / 2**30
    for name, times in timings.items():
        rate = tokens / statistics.median(times[warmup:])
        result[f"{name}_tok_s"] = rate
        result[f"{name}_mfu"] = rate * ours.flops_per_token / peak
        result[f"{name}_first_step_s"] = first_step[name]
    if not ours_only:
        result["ratio"] = result["darkhorse_tok_s"] / result["transformers_tok_s"]
    if compile and not ours_only:
        result["ratio_vs_compiled"] = result["darkhorse_tok_s"] / result["transformers_compiled_tok_s"]
    return result


def hf_contenders(ours: Trainer, config: RunConfig, hf_experts: str, compile: bool) -> dict[str, Callable[[int], None]]:
    """transformers' twin's training step on our batches, eager and (with `compile`) compiled."""
    torch.manual_seed(0)
    theirs = hf_twin(ours.config, hf_experts).to(ours.device)
    assert sum(p.numel() for p in theirs.parameters()) == ours.model.num_params(), "models differ in size"
    theirs_optimizer = torch.optim.AdamW(
        theirs.parameters(), lr=config.train.lr, betas=(config.train.beta1, config.train.beta2), fused=True
    )

    def their_step(forward: Callable) -> Callable[[int], None]:
        def run(step: int) -> None:
            batch = ours.loader.batch(step, 0)
            with ours._autocast():
                loss = forward(input_ids=batch.inputs, labels=batch.inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), config.train.grad_clip)
            theirs_optimizer.step()
            theirs_optimizer.zero_grad(set_to_none=True)

        return run

    contenders = {"transformers": their_step(theirs)}
    if compile:  # one model and optimizer, two forwards: eager and compiled take turns on the same weights
        contenders["transformers_compiled"] = their_step(torch.compile(theirs))
    return contenders


def write_profile(
    path: Path, contenders: dict[str, Callable[[int], None]], device: torch.device, title: str, sync: Callable
) -> None:
    """Append each contender's operator table (sorted by self device time) over two more steps."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with path.open("a") as out:
        for name, run_step in contenders.items():
            sync()
            start = time.perf_counter()
            with torch.profiler.profile(activities=activities) as profiler:
                for step in range(2):
                    run_step(step)
                sync()
            wall = time.perf_counter() - start
            out.write(f"## {name}: {title}, 2 steps, {wall * 1e3:.0f} ms wall under the profiler\n")
            out.write(profiler.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=90) + "\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny-cpu", "d20"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall time, or process CPU time")
    parser.add_argument("--compile", action="store_true", help="also a train.compile=true row per preset and dtype")
    parser.add_argument("--compile-only", action="store_true", help="only the train.compile=true rows")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both models train there)")
    parser.add_argument("--profile", type=Path, help="append operator tables of two profiled steps per model here")
    parser.add_argument(
        "--hf-experts", default="eager", choices=["eager", "grouped_mm"], help="transformers' MoE experts code"
    )
    parser.add_argument("--kernels", nargs="+", default=["auto"], help="train.kernels values, a row each")
    parser.add_argument("--ours-only", action="store_true", help="time darkhorse alone (no transformers twin)")
    parser.add_argument("--json", type=Path, help="append each row's figures here, one JSON object a line")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, {args.clock} clock")
    header = f"{'preset':<22}{'dtype':<6}{'tokens':>8}{'darkhorse tok/s':>17}{'HF tok/s':>10}{'ratio':>7}{'MFU':>7}"
    print(header)
    with tempfile.TemporaryDirectory() as work:
        for preset in args.presets:
            for dtype in args.dtypes:
                for compile in (True,) if args.compile_only else (False, True) if args.compile else (False,):
                    for kernels in args.kernels:
                        r = bench(preset, dtype, args.batch_size, args.seq_len, args.steps, args.warmup, Path(work),
                                  compile=compile, clock=clock, device=args.device, hf_experts=args.hf_experts,
                                  profile=args.profile, kernels=kernels, ours_only=args.ours_only)  # fmt: skip
                        report(r, preset, dtype, compile, args)


def report(r: dict, preset: str, dtype: str, compile: bool, args: argparse.Namespace) -> None:
    name = f"{preset}{'+compile' if compile else ''}{'+liger' if r['kernels'] == 'liger' else ''}"
    hf = "-" if args.ours_only else f"{r['transformers_tok_s']:.0f}"
    ratio = "-" if args.ours_only else f"{r['ratio']:.2f}x"
    print(
        f"{name:<22}{dtype:<6}{args.batch_size * args.seq_len:>8}{r['darkhorse_tok_s']:>17.0f}{hf:>10}{ratio:>7}"
        f"{100 * r['darkhorse_mfu']:>6.1f}%"
        + (f"  (HF MFU {100 * r['transformers_mfu']:.1f}%)" if args.device != "cpu" and not args.ours_only else "")
        + (f"  peak {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""),
        flush=True,
    )
    if compile:
        line = f"  first step (compilation) darkhorse {r['darkhorse_first_step_s']:.1f} s"
        if not args.ours_only:
            line = (
                f"  vs compiled HF ({r['transformers_compiled_tok_s']:.0f} tok/s): {r['ratio_vs_compiled']:.2f}x;"
                f"{line}, HF {r['transformers_compiled_first_step_s']:.1f} s"
            )
        print(line, flush=True)
    if args.json:
        with args.json.open("a") as out:
            out.write(json.dumps({"compile": compile, **r}) + "\n")


if __name__ == "__main__":
    main()
