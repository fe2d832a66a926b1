"""Demo accuracy per seed and per preset: the demo goals at a fixed step budget.

Each (preset, seed) runs the whole `darkhorse demo` pipeline in its own process at the same step
count (so the same number of training tokens, whatever the machine's load) and the script prints
held-out exact match per skill for every run, then per preset the mean and the minimum over the
seeds, as markdown tables for docs/benchmarks.md. Skills appear abruptly and the step where they do
moves with the seed, so the goal is read off the minimum: >= 90% on held-out 2-digit addition and
on sorting 5 numbers, and >= 70% over all skills, within 1,500 steps (what 5 minutes buy on a slow
2-core machine), in every seed.

    .venv/bin/python bench/bench_demo.py --presets genesis-demo --seeds 0 1 2        # 1,500 steps
    python bench/bench_demo.py --seeds 0 1 2 --jobs 6       # a many-core machine: one thread per run
    python bench/bench_demo.py --presets genesis-demo --seeds 0 -- model.mtp_depth=1  # overrides

`--step-time PREPARED` answers the other half of a demo change, that `make demo` buys the same steps in
its minutes: it times `Trainer.train_step` of the first preset as is and with each `--variant`'s
overrides, interleaved step by step in one process on one thread, in process CPU time (a loaded
machine disturbs it least), and prints each variant's median step and its ratio to the preset's.
PREPARED is a demo's prepared/ folder (any earlier `darkhorse demo --out DIR` leaves DIR/prepared).

    python bench/bench_demo.py --step-time runs/demo/prepared --variant "model.n_layers=3 model.ffn_dim=256"

With `--against REF` it times the code of git revision REF (its src/, unpacked to a temporary folder)
against the working tree's: each side times its steps in its own process, the two alternate
`--repeats` times, and each variant's median over those is compared with REF's preset step, so the
batch the new code fits in the old step time reads off the table.

    python bench/bench_demo.py --step-time runs/demo/prepared --against main --variant train.batch_size=18
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_demo(preset: str, seed: int, max_steps: int, work: Path, one_thread: bool, overrides: list[str]) -> dict:
    out = work / f"{preset}-s{seed}"
    argv = ["demo", "--preset", preset, "--max-steps", str(max_steps), "--seed", str(seed), "--out", str(out)]
    argv += overrides
    env = dict(os.environ, TERM="dumb")
    if one_thread:  # runs side by side: one core each, tokenizer training included
        env.update(OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1")
    log = work / f"{preset}-s{seed}.log"
    with log.open("w") as sink:
        code = subprocess.run([sys.executable, "-m", "darkhorse.cli", *argv], stdout=sink, stderr=sink, env=env)
    if code.returncode != 0:
        raise SystemExit(f"darkhorse demo --preset {preset} --seed {seed} failed ({code.returncode}); see {log}")
    return json.loads((out / "eval.json").read_text())


def markdown(results: dict[str, dict]) -> str:
    runs = list(results)
    lines = ["| held-out exact match | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    skills = sorted({skill for result in results.values() for skill in result["by_skill"]})
    for skill in skills:
        cells = [f"{100 * results[r]['by_skill'][skill]['accuracy']:.0f}%" for r in runs]
        lines.append(f"| {skill} | " + " | ".join(cells) + " |")
    rows = {
        "all": [f"{100 * results[r]['overall']['accuracy']:.0f}%" for r in runs],
        "val loss": [f"{results[r]['val_loss']:.3f}" for r in runs],
        "training minutes": [f"{results[r]['train_seconds'] / 60:.1f}" for r in runs],
        "steps": [str(results[r]["steps"]) for r in runs],
    }
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]
    return "\n".join(lines)


def seed_summary(results: dict[str, dict], presets: list[str]) -> str:
    """Per preset, each skill's mean and minimum accuracy over its seeds (the goal holds if the minimum does)."""
    skills = sorted({skill for result in results.values() for skill in result["by_skill"]})
    header = "| mean / min over seeds | " + " | ".join([*skills, "all"]) + " |"
    lines = [header, "|---|" + "---:|" * (len(skills) + 1)]
    for preset in presets:
        runs = [result for name, result in results.items() if name.startswith(f"{preset} s")]
        cells = []
        for skill in [*skills, None]:
            scores = [100 * (r["overall"] if skill is None else r["by_skill"][skill])["accuracy"] for r in runs]
            cells.append(f"{sum(scores) / len(scores):.1f} / {min(scores):.0f}%")
        lines.append(f"| {preset} ({len(runs)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_times(preset: str, prepared: Path, variants: list[str], rounds: int) -> dict[str, float]:
    """Median CPU seconds per training step of `preset` and of each variant, timed in turns."""
    import statistics
    import tempfile
    import time

    import torch

    from darkhorse.commands.demo import DEMO_OVERRIDES
    from darkhorse.config import load_run_config
    from darkhorse.data.prepared import open_prepared
    from darkhorse.train.run_dir import plan_run
    from darkhorse.train.trainer import Trainer

    torch.set_num_threads(1)
    vocab = open_prepared(prepared).vocab_size
    trainers, timings = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-demo-step-") as work:
        for index, variant in enumerate(["", *variants]):
            overrides = [*DEMO_OVERRIDES, f"model.vocab_size={vocab}", *variant.split()]
            config = load_run_config(preset=preset, overrides=overrides)
            trainers[variant or preset] = Trainer(plan_run(config, [(prepared, 1.0)], f"{work}/{index}"), verbose=False)
        for _ in range(2):  # warm-up
            for trainer in trainers.values():
                trainer.train_step()
        for _ in range(rounds):
            for name, trainer in trainers.items():
                start = time.process_time()
                trainer.train_step()
                timings.setdefault(name, []).append(time.process_time() - start)
    return {name: statistics.median(seconds) for name, seconds in timings.items()}


def step_table(preset: str, medians: dict[str, float], rounds: int) -> str:
    base = medians[preset]
    lines = [f"| variant | step (CPU ms, median of {rounds}) | ratio |", "|---|---:|---:|"]
    lines += [f"| {name} | {1000 * seconds:.1f} | {seconds / base:.2f}x |" for name, seconds in medians.items()]
    return "\n".join(lines)


def step_times_against(ref: str, preset: str, prepared: Path, variants: list[str], rounds: int, repeats: int) -> str:
    """`step_times` in child processes, REF's src/ and the working tree's in turns; a markdown table."""
    import statistics
    import tempfile

    repo = Path(__file__).resolve().parents[1]
    argv = [sys.executable, __file__, "--presets", preset, "--step-time", str(prepared), "--rounds", str(rounds)]
    argv += [f"--variant={variant}" for variant in variants] + ["--json"]
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="bench-demo-ref-") as old_root:
        archive = subprocess.run(["git", "-C", str(repo), "archive", ref, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", old_root], input=archive.stdout, check=True)
        sources = {"old": Path(old_root) / "src", "new": repo / "src"}
        for _ in range(repeats):
            for side, src in sources.items():
                env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
                child = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
                runs[side].append(json.loads(child.stdout.strip().splitlines()[-1]))
    median = {side: {name: statistics.median(r[name] for r in got) for name in got[0]} for side, got in runs.items()}
    base = median["old"][preset]
    lines = [
        f"| variant | {ref} (CPU ms) | working tree (CPU ms) | working tree / {ref}'s {preset} |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds in median["new"].items():
        lines.append(f"| {name} | {1000 * median['old'][name]:.1f} | {1000 * seconds:.1f} | {seconds / base:.2f}x |")
    return "\n".join(lines) + f"\n\n(medians over {repeats} alternating processes of {rounds} steps each)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["genesis-demo", "demo-cpu"])
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (> 1: one thread each)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-demo"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run (after --)")
    parser.add_argument("--step-time", type=Path, metavar="PREPARED", help="time steps instead (see above)")
    parser.add_argument("--variant", action="append", default=[], help="with --step-time: 'KEY=VALUE ...' to time")
    parser.add_argument("--rounds", type=int, default=15, help="with --step-time: timed steps per variant")
    parser.add_argument("--against", metavar="REF", help="with --step-time: also time git revision REF's code")
    parser.add_argument("--repeats", type=int, default=5, help="with --against: processes per side, alternating")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # --against's child processes
    args = parser.parse_args()
    if args.step_time and args.against:
        timed = (args.presets[0], args.step_time, args.variant, args.rounds, args.repeats)
        print(step_times_against(args.against, *timed))
        return
    if args.step_time:
        medians = step_times(args.presets[0], args.step_time, args.variant, args.rounds)
        print(json.dumps(medians) if args.json else step_table(args.presets[0], medians, args.rounds))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    runs = [(preset, seed) for preset in args.presets for seed in args.seeds]
    shared = (args.max_steps, args.work, args.jobs > 1, args.overrides)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {f"{preset} s{seed}": pool.submit(run_demo, preset, seed, *shared) for preset, seed in runs}
        results = {name: future.result() for name, future in futures.items()}
    print(markdown(results))
    print()
    print(seed_summary(results, args.presets))


if __name__ == "__main__":
    main()
