"""Scale-out on CPU with gloo: weak scaling of training tokens/s from 1 to 2 processes, the share of a
DDP step spent communicating, and memory per rank with FSDP against DDP.

Each rank trains the preset at its own micro-batch (weak scaling: 2 processes do twice the work of
one) on random tokens, with the real darkhorse pieces: `parallelize` (DDP or FSDP2), the optimizers
and gradient sync of `train/`. The communication share of a DDP step is 1 - (step without gradient
sync) / (step with it), both timed in the same process. Memory per rank is what the rank holds in
parameters, gradients and optimizer state (local shards for FSDP), plus the process's peak RSS.

    PYTHONPATH=src python bench/bench_scale.py --presets d20 genesis-tiny --steps 8 --repeats 3

prints a markdown table for docs/benchmarks.md (it starts torchrun itself; one rank's run is
`torchrun --standalone --nproc-per-node N bench/bench_scale.py --rank-run PRESET PARALLEL`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

SEQ_LEN, BATCH = 128, 4


def held_bytes(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    """Parameters, gradients and optimizer state this rank holds (an FSDP shard counts its local part)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = [local(p) for p in model.parameters()]
    weights_and_grads = 2 * sum(p.numel() * p.element_size() for p in params)  # a grad is its param's size
    states = [local(v) for opt in optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return weights_and_grads + sum(t.numel() * t.element_size() for t in states)


def rank_run(preset: str, parallel: str, steps: int) -> None:
    from darkhorse.config import load_run_config
    from darkhorse.model import Transformer
    from darkhorse.train.distributed import init_world
    from darkhorse.train.optim import build_optimizers
    from darkhorse.train.parallel import gradient_sync, parallelize

    torch.set_num_threads(1)
    overrides = [f"train.seq_len={SEQ_LEN}", f"train.batch_size={BATCH}", f"train.parallel={parallel}"]
    config = load_run_config(preset, overrides=[*overrides, "train.optimizer=adamw", "train.dtype=fp32"])
    world = init_world(config.train, torch.device("cpu"))
    torch.manual_seed(0)
    model = Transformer(config.model).train()
    wrapped = parallelize(model, config.train, world)
    optimizers = build_optimizers(model, config.train, torch.device("cpu"))
    generator = torch.Generator().manual_seed(world.rank)
    tokens = torch.randint(0, config.model.vocab_size, (BATCH, SEQ_LEN + 1), generator=generator)

    def step(sync: bool) -> float:
        start = time.perf_counter()
        with gradient_sync(wrapped, sync):
            wrapped(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if world.size > 1:
            dist.barrier()
        return time.perf_counter() - start

    step(True), step(True)  # warm-up
    synced = statistics.median(step(True) for _ in range(steps))
    local_only = statistics.median(step(False) for _ in range(steps)) if parallel == "ddp" else None
    held = held_bytes(model, optimizers)
    if world.rank == 0:
        print(
            json.dumps(
                {
                    "tokens_per_s": world.size * BATCH * SEQ_LEN / synced,
                    "step_s": synced,
                    "comm_share": None if local_only is None else max(0.0, 1 - local_only / synced),
                    "held_gib": held / 2**30,
                    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                    "params": sum(p.numel() for p in model.parameters()),
                }
            ),
            flush=True,
        )
    if world.launched:
        dist.destroy_process_group()


def launch(preset: str, parallel: str, nproc: int, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1 and parallel == "none":
        command = [sys.executable, __file__, "--rank-run", preset, parallel, "--steps", str(steps)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        command += [__file__, "--rank-run", preset, parallel, "--steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{preset} {parallel} x{nproc} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["d20", "genesis-tiny"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank-run", nargs=2, metavar=("PRESET", "PARALLEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_run:
        rank_run(*args.rank_run, args.steps)
        return
    print(f"{BATCH} x {SEQ_LEN} tokens per rank per step, fp32, AdamW; medians of {args.repeats} runs\n")
    print("| preset | layout | tokens/s (all ranks) | weak-scaling efficiency | comm share of step | "
          "params+grads+optimizer per rank | peak RSS per rank |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        single = None
        for parallel, nproc in (("none", 1), ("ddp", 2), ("fsdp", 2)):
            runs = [launch(preset, parallel, nproc, args.steps) for _ in range(args.repeats)]
            figure = {key: statistics.median(r[key] for r in runs) if runs[0][key] is not None else None
                      for key in runs[0]}  # fmt: skip
            single = single or figure
            efficiency = figure["tokens_per_s"] / (nproc * single["tokens_per_s"])
            comm = f"{figure['comm_share']:.0%}" if figure["comm_share"] is not None else "-"
            print(
                f"| {preset} ({figure['params'] / 1e6:.1f}M) | {nproc} x {parallel} | {figure['tokens_per_s']:,.0f} | "
                f"{efficiency:.2f} | {comm} | {figure['held_gib'] * 1024:,.1f} MiB | "
                f"{figure['peak_rss_gib']:.2f} GiB |",
                flush=True,
            )


if __name__ == "__main__":
    main()
