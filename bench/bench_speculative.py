"""MTP speculative decoding on a trained genesis-demo model: acceptance rate and tokens/s with and without it.

The model is trained here with `darkhorse demo --max-steps N model.mtp_depth=1 train.batch_size=8`
(genesis-demo with one MTP module, as the demo trained it before 2026-11-30; the demo's chat corpus),
unless `--checkpoint` names a trained one with an MTP module. The prompts are
the demo's held-out problems (`--per-skill` of each skill), rendered as chat prompts, decoded greedily one
at a time (single stream, batch 1) up to the chat stop ids or `--max-new-tokens`, by `Engine.generate`
with and without `speculative="mtp"`; the two sides take turns for `--repeats` rounds and each reports its
median tokens/s. The script checks that both write the same tokens.

Usage: python bench/bench_speculative.py [--checkpoint DIR] [--max-steps 1500] [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def train_demo(work: Path, max_steps: int) -> Path:
    """A genesis-demo checkpoint with an MTP module, trained by `darkhorse demo` (its output goes to a log file)."""
    out = work / "demo"
    command = [sys.executable, "-m", "darkhorse", "demo", "--out", str(out), "--max-steps", str(max_steps)]
    command += ["model.mtp_depth=1", "train.batch_size=8"]
    with open(work / "demo.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return out / "run" / "final"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained model with an MTP module (default: train one)")
    parser.add_argument("--max-steps", type=int, default=1500, help="training steps when training here")
    parser.add_argument("--per-skill", type=int, default=5, help="held-out problems per skill (6 skills)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from darkhorse.checkpoint import load_for_inference
    from darkhorse.data.demo_corpus import build_demo_corpus
    from darkhorse.eval.exact_match import split_record
    from darkhorse.infer.engine import Engine
    from darkhorse.infer.prompting import chat_stop_ids, render_chat_prompt

    with tempfile.TemporaryDirectory(prefix="bench-speculative-") as work:
        started = time.perf_counter()
        checkpoint = args.checkpoint or train_demo(Path(work), args.max_steps)
        train_seconds = time.perf_counter() - started
        model, tokenizer, _ = load_for_inference(checkpoint)
    records = [e.to_record() for e in build_demo_corpus(seed=0, train_size=0, heldout_per_skill=args.per_skill).heldout]
    prompts = [
        tokenizer.encode(render_chat_prompt(tokenizer, split_record(r)[0], think=bool(r.get("reasoning"))))
        for r in records
    ]
    stop_ids = chat_stop_ids(tokenizer)

    def run(speculative: str | None) -> tuple[list[list[int]], float, Engine]:
        engine = Engine(model, tokenizer.vocab_size)
        begin = time.perf_counter()
        options = dict(max_new_tokens=args.max_new_tokens, stop_ids=stop_ids, speculative=speculative)
        outputs = [engine.generate([prompt], **options)[0] for prompt in prompts]
        return outputs, time.perf_counter() - begin, engine

    run(None), run("mtp")  # warm-up
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {"plain": [], "mtp": []}
    for _ in range(args.repeats):
        plain, plain_seconds, _ = run(None)
        spec, spec_seconds, engine = run("mtp")
        seconds["plain"].append(plain_seconds)
        seconds["mtp"].append(spec_seconds)
    load_after = os.getloadavg()[0]
    tokens = sum(len(output) for output in plain)
    rates = {name: tokens / statistics.median(values) for name, values in seconds.items()}
    stats = engine.speculation
    result = {
        "model": str(args.checkpoint or f"genesis-demo, darkhorse demo --max-steps {args.max_steps}"),
        "train_seconds": None if args.checkpoint else round(train_seconds, 1),
        "prompts": len(prompts),
        "tokens": tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "same_tokens": spec == plain,
        "drafts": stats.drafted,
        "accepted": stats.accepted,
        "acceptance": round(stats.acceptance, 3),
        "tokens_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "speedup": round(rates["mtp"] / rates["plain"], 2),
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
