"""The fused head loss (chunked linear + cross-entropy, `return_logits=False`, what the trainer runs)
against the plain one (whole logits, then their fp32 cross-entropy), on a vocab-heavy model.

Step time: forward + backward of the whole model, the two losses taking turns in one process, timed in
process CPU time (1 thread), median of --repeats. Peak memory: each loss in a fresh process, the peak RSS
of one that builds the model and runs --steps steps minus that of one that builds it and runs none.

    .venv/bin/python bench/bench_head_loss.py                    # tiny-cpu's body, vocab 65,536, 8 x 128
    .venv/bin/python bench/bench_head_loss.py --preset genesis-tiny --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from darkhorse.config import load_run_config
from darkhorse.model import Transformer


def build(args: argparse.Namespace) -> tuple[Transformer, torch.Tensor, torch.Tensor]:
    config = load_run_config(args.preset, overrides=[f"model.vocab_size={args.vocab}"]).model
    torch.manual_seed(0)
    model = Transformer(config).train()
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    return model, tokens, tokens.roll(-1, 1)


def step(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor, fused: bool, dtype: str) -> None:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    with autocast:
        loss = model(tokens, targets, mtp_weight=0.3, return_logits=not fused).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def peak_rss_mib(args: argparse.Namespace, fused: bool | None) -> float:
    """Peak RSS (MiB) of a fresh process that builds the model and runs --steps steps (none for None)."""
    command = [sys.executable, __file__, "--child", json.dumps({"fused": fused, **vars(args)})]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])


def child(spec: dict) -> None:
    torch.set_num_threads(1)
    args = argparse.Namespace(**spec)
    model, tokens, targets = build(args)
    if spec["fused"] is not None:
        for _ in range(args.steps):
            step(model, tokens, targets, spec["fused"], args.dtype)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="steps per memory-measuring process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    # memory first: a child started by a big parent would report the parent's peak RSS (inherited at fork)
    base = peak_rss_mib(args, None)
    plain_peak, fused_peak = peak_rss_mib(args, False) - base, peak_rss_mib(args, True) - base
    torch.set_num_threads(1)
    model, tokens, targets = build(args)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats + 1):  # the first round warms up
        for fused in (False, True):
            start = time.process_time()
            step(model, tokens, targets, fused, args.dtype)
            times[fused].append(time.process_time() - start)
    plain, fused = (statistics.median(times[f][1:]) for f in (False, True))
    with open("/proc/loadavg") as load:
        where = f"{args.preset} body, vocab {args.vocab}, {args.batch} x {args.seq_len}, {args.dtype}"
        print(f"{where}, load {load.read().split()[0]}")
    print(f"step CPU time: plain {plain * 1e3:.0f} ms, fused {fused * 1e3:.0f} ms, fused/plain {fused / plain:.2f}x")
    print(f"step peak RSS above the built model: plain {plain_peak:.0f} MiB, fused {fused_peak:.0f} MiB, "
          f"fused/plain {fused_peak / plain_peak:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
