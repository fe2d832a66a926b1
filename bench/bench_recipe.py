"""Training recipe (issue 17): a preset's default recipe against a nanoGPT/GPT-2-style baseline, or against
itself with one lever changed, at equal wall-clock on the same tokens.

The baseline is a config of our own model: AdamW, cosine decay to 0.1x, GELU MLP (ungated, at 1.5x
ffn_dim so it has SwiGLU's parameter count), learned absolute positions, tied embeddings, at the
preset's pre-issue-17 lr (BASELINE_LR). What it keeps of ours: RMSNorm, no biases, GQA as the preset has it.
Each pair trains as two `darkhorse train --minutes M` processes with the same seed (so the same windows in the
same order), evaluating once at the end on the same val batches; the ratio of their val bits-per-byte is the
figure (below 1: the first contender wins). On CPU the two run side by side, one thread each; with `--device
cuda` one after the other, each with the GPU to itself.

Corpora, prepared once into WORK (reused when present): `package`, Python sources, markdown docs and
package READMEs from the installed packages (bench/domain_corpus_from_packages.py), and `demo`, the
chat skills of `darkhorse demo` (data/demo_corpus.py; the loss, and so val bpb, counts the replies only).

    .venv/bin/python bench/bench_recipe.py --preset tiny-cpu --minutes 2.5 --work /tmp/recipe
    .venv/bin/python bench/bench_recipe.py --against default --levers muon wsd --minutes 2.5 --work /tmp/recipe
    .venv/bin/python bench/bench_recipe.py --preset forge-nano --device cuda --minutes 5 --work /tmp/recipe
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from darkhorse.config import load_run_config, preset_dict

HERE = Path(__file__).resolve().parent
# the lr each CPU preset had before issue 17 (AdamW, cosine): the baseline's, so it does not move with the defaults
BASELINE_LR = {"tiny-cpu": 3e-3, "forge-nano": 6e-4}
BASELINE = [
    "train.optimizer=adamw", "train.schedule=cosine", "train.min_lr_ratio=0.1", "train.weight_decay=0.1",
    "train.beta1=0.9", "train.beta2=0.95", "train.embedding_lr=0", "train.head_lr=0",
    "model.ffn_activation=gelu", "model.positions=learned", "model.tie_embeddings=true", "model.qk_norm=false",
    "model.zero_init_out=false", "model.logit_softcap=0",
]  # fmt: skip
# one change each against the preset's default; `old` undoes the issue-17 defaults (the pre-issue recipe)
LEVERS = {
    "old": ["train.recipe=classic"],
    "adamw": ["train.optimizer=adamw"],
    "muon": ["train.optimizer=muon", "train.muon_lr=0.02"],
    "muon-lion": ["train.optimizer=muon", "train.scalar_optimizer=lion", "train.lr=3e-4"],
    "cosine": ["train.schedule=cosine"],
    "wsd": ["train.schedule=wsd"],
    "qk-norm": ["model.qk_norm=true"],
    "no-qk-norm": ["model.qk_norm=false"],
    "relu2": ["model.ffn_activation=relu2", "FFN_X1.5"],
    "zero-init": ["model.zero_init_out=true"],
    "softcap": ["model.logit_softcap=15"],
    "untied": ["model.tie_embeddings=false"],
    "untied-lr": ["model.tie_embeddings=false", "train.embedding_lr=0.05", "train.head_lr=0.002"],
    "embedding-lr": ["train.embedding_lr=0.02"],
    "value-embeds": ["model.value_embeds=1"],
    "value-embeds-2": ["model.value_embeds=2"],
    "batch-warmup": ["train.batch_warmup_steps=20"],
    "seq-warmup": ["train.seq_warmup_steps=20"],
    # the training-side winners alone (Genesis: its MLA has no QK-norm)
    "train-winners": [
        "train.optimizer=muon",
        "train.schedule=wsd",
        "model.tie_embeddings=false",
        "train.embedding_lr=0.05",
        "train.head_lr=0.002",
    ],  # fmt: skip
    "lr-x2": ["LR_X2"],
    "lr-half": ["LR_HALF"],
}


def prepare_corpora(work: Path, vocab_size: int) -> dict[str, Path]:
    """The package and demo corpora as prepared dirs under `work`, built on first use."""
    dirs = {"package": work / "package", "demo": work / "demo"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    if not (dirs["package"] / "meta.json").exists():
        raw = work / "package.jsonl"
        subprocess.run([sys.executable, HERE / "domain_corpus_from_packages.py", raw], check=True, env=env)
        darkhorse("prepare", "--input", raw, "--out", dirs["package"], "--vocab-size", vocab_size, "--force")
    if not (dirs["demo"] / "meta.json").exists():
        from darkhorse.data.demo_corpus import build_demo_corpus, write_jsonl

        raw = work / "demo.jsonl"
        write_jsonl(build_demo_corpus(0).train, raw)
        darkhorse("prepare", "--input", raw, "--out", dirs["demo"], "--vocab-size", vocab_size, "--force")
    return dirs


def darkhorse(*args: object, threads: int | None = None, wait: bool = True) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    process = subprocess.Popen(
        [sys.executable, "-m", "darkhorse", *map(str, args)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    if wait and process.wait():
        raise SystemExit(f"darkhorse {args[0]} failed:\n{process.stderr.read().decode()}")
    return process


def resolve(preset: str, overrides: list[str]) -> list[str]:
    """Expand the placeholders that depend on the preset (1.5x FFN width, lr multiples)."""
    config = load_run_config(preset)
    factors = {"LR_X2": ("train.lr", config.train.lr * 2), "LR_HALF": ("train.lr", config.train.lr / 2)}
    out = []
    for item in overrides:
        if item == "FFN_X1.5":
            out.append(f"model.ffn_dim={config.model.ffn_dim * 3 // 2}")
        elif item in factors:
            out.append(f"{factors[item][0]}={factors[item][1]:g}")
        else:
            out.append(item)
    return out


def contender(name: str, preset: str, base: list[str]) -> list[str]:
    """The overrides of contender `name`; `base` (--with) goes under the default and every lever."""
    if name == "baseline":
        lr = BASELINE_LR.get(preset, preset_dict(preset)["train"]["lr"])
        return resolve(preset, [*BASELINE, "FFN_X1.5", f"train.lr={lr}"])
    return [*base, *resolve(preset, LEVERS[name] if name != "default" else [])]


def train_pair(
    preset: str,
    names: tuple[str, str],
    data: Path,
    runs: Path,
    minutes: float,
    seed: int,
    eval_steps: int,
    base: list[str],
    device: str,
) -> list[dict]:
    """Train both contenders (on CPU side by side, one thread each; on a GPU one after the other); their
    logged losses and final val figures."""
    options = ["--preset", preset, "--data", data, "--minutes", minutes]
    overrides = [
        "train.max_steps=0", f"train.seed={seed}", "train.eval_interval=1000000000", f"train.eval_steps={eval_steps}",
        "train.save_interval=0", "train.log_interval=25", f"train.device={device}",
    ]  # fmt: skip
    side_by_side = device == "cpu"
    processes = []
    for name in names:
        out = runs / f"{data.name}-{name}-{seed}"
        if out.exists():
            subprocess.run(["rm", "-rf", out], check=True)
        args = ["train", *options, "--out", out, *overrides, *contender(name, preset, base)]
        process = darkhorse(*args, threads=1 if side_by_side else None, wait=False)
        if not side_by_side:
            process.wait()  # the next one starts with the device to itself
        processes.append((name, out, process))
    results = []
    for name, out, process in processes:
        if process.wait():
            for _, _, other in processes:  # never leave the partner training on
                other.kill()
            raise SystemExit(f"training {name} failed:\n{process.stderr.read().decode()[-3000:]}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
        final = [r for r in records if r.get("val_bpb") is not None][-1]
        results.append({"name": name, "steps": losses[-1][0], "losses": losses, "val_bpb": final["val_bpb"]})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--minutes", type=float, default=2.5, help="wall-clock budget of each run")
    parser.add_argument("--work", type=Path, default=Path("/tmp/darkhorse-recipe"), help="corpora and runs")
    parser.add_argument("--corpus", nargs="+", default=["package", "demo"], choices=["package", "demo"])
    parser.add_argument("--against", default="baseline", choices=["baseline", "default"], help="the first contender")
    parser.add_argument("--levers", nargs="+", default=["default"], help=f"default or: {', '.join(LEVERS)}")
    parser.add_argument(
        "--with",
        dest="base",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="overrides under the default and every lever (a candidate default), not the baseline",
    )
    parser.add_argument("--repeats", type=int, default=1, help="pairs per lever, seeds SEED, SEED+1, ...")
    parser.add_argument("--seed", type=int, default=1337, help="the first pair's seed")
    parser.add_argument("--eval-steps", type=int, default=40, help="val batches scored at the end")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--log", type=Path, help="append each pair's results (losses included) here as JSON lines")
    parser.add_argument("--device", default="cpu", help="cpu (the pair side by side) or cuda[:N] (one after the other)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    dirs = prepare_corpora(args.work, args.vocab_size)
    how = "2 processes x 1 thread" if args.device == "cpu" else f"one after the other on {args.device}"
    print(f"{args.preset}, {args.minutes:g} min per run, {how}; load {os.getloadavg()[0]:.2f}")
    if args.base:
        print(f"default and levers with: {' '.join(args.base)}")
    print(f"{'corpus':<9}{'lever':<14}{'first bpb':>10}{'steps':>7}{'lever bpb':>10}{'steps':>7}{'ratio':>8}")
    for corpus in args.corpus:
        for lever in args.levers:
            ratios = []
            for repeat in range(args.repeats):
                pair = train_pair(
                    args.preset, (args.against, lever), dirs[corpus], args.work / "runs", args.minutes,
                    args.seed + repeat, args.eval_steps, args.base, args.device,
                )  # fmt: skip
                first, second = pair
                ratios.append(second["val_bpb"] / first["val_bpb"])
                print(
                    f"{corpus:<9}{lever:<14}{first['val_bpb']:>10.4f}{first['steps']:>7}{second['val_bpb']:>10.4f}"
                    f"{second['steps']:>7}{ratios[-1]:>8.3f}   (load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
                if args.log:
                    record = {"preset": args.preset, "corpus": corpus, "minutes": args.minutes,
                              "seed": args.seed + repeat, "with": args.base, "pair": pair}  # fmt: skip
                    with args.log.open("a") as log:
                        log.write(json.dumps(record) + "\n")
            if args.repeats > 1:
                print(f"{corpus:<9}{lever:<14}median ratio {statistics.median(ratios):.3f} of {len(ratios)}")


if __name__ == "__main__":
    main()
