"""Demo accuracy: Genesis (genesis-demo, the demo default) vs the dense demo-cpu model, same run.

Each preset runs the whole `darkhorse demo` pipeline (same corpus seed, same step count, so the
same number of training tokens) and the script prints held-out exact match per skill for both,
their training minutes and the ratio, as a markdown table for docs/benchmarks.md. The goal (>= 90%
on held-out 2-digit addition and sorting 5 numbers within 5 minutes on 2 CPU cores) is read off
the `addition` and `sort` rows together with the minutes column.

    .venv/bin/python bench/bench_demo.py --max-steps 600 --work /tmp/bench-demo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from darkhorse.cli import main as darkhorse


def run_preset(preset: str, max_steps: int, work: Path, seed: int) -> dict:
    out = work / preset
    argv = ["demo", "--preset", preset, "--max-steps", str(max_steps), "--seed", str(seed), "--out", str(out)]
    code = darkhorse(argv)
    if code != 0:
        raise SystemExit(f"darkhorse demo --preset {preset} failed with exit code {code}")
    return json.loads((out / "eval.json").read_text())


def markdown(results: dict[str, dict]) -> str:
    presets = list(results)
    lines = [
        "| held-out exact match | " + " | ".join(presets) + " |",
        "|---|" + "---:|" * len(presets),
    ]
    skills = sorted({skill for result in results.values() for skill in result["by_skill"]})
    for skill in skills:
        cells = [f"{100 * results[p]['by_skill'][skill]['accuracy']:.0f}%" for p in presets]
        lines.append(f"| {skill} | " + " | ".join(cells) + " |")
    rows = {
        "all": [f"{100 * results[p]['overall']['accuracy']:.0f}%" for p in presets],
        "training minutes": [f"{results[p]['train_seconds'] / 60:.1f}" for p in presets],
        "steps": [str(results[p]["steps"]) for p in presets],
    }
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["genesis-demo", "demo-cpu"])
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-demo"))
    args = parser.parse_args()
    results = {preset: run_preset(preset, args.max_steps, args.work, args.seed) for preset in args.presets}
    print(markdown(results))
    if len(args.presets) == 2:
        first, second = (results[p]["train_seconds"] for p in args.presets)
        print(f"\ntraining time ratio {args.presets[0]} / {args.presets[1]}: {first / second:.2f}")


if __name__ == "__main__":
    main()
