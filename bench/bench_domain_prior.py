"""Domain-guided routing on the demo corpus: I(domain; expert) per MoE layer with and without
`moe.domain_prior`, same corpus, same steps, same seed (issue 4, item 4).

Both runs train genesis-tiny on the demo corpus's domain-tagged chat records; routing is then
measured on the val split with the tags withheld, so the figure shows what the router learned,
not the (annealed-away) prior bonus itself. Prints a markdown table for docs/benchmarks.md.

    .venv/bin/python bench/bench_domain_prior.py --max-steps 150 --work /tmp/bench-prior
"""

from __future__ import annotations

import argparse
from pathlib import Path

from darkhorse.config import load_run_config
from darkhorse.data.demo_corpus import build_demo_corpus, write_jsonl
from darkhorse.data.prepare import prepare
from darkhorse.model.routing import compare_domain_prior


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="genesis-tiny")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--train-size", type=int, default=8000, help="demo-corpus training records")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-prior"))
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    corpus = build_demo_corpus(seed=0, train_size=args.train_size)
    records = args.work / "demo.jsonl"
    write_jsonl(corpus.train, records)
    prepared = args.work / "prepared"
    prepare([records], prepared, vocab_size=512, force=True)

    anneal = max(args.max_steps // 2, 1)  # the bonus is gone for the second half of training
    config = load_run_config(
        args.preset,
        overrides=[f"train.max_steps={args.max_steps}", f"model.moe.domain_prior_anneal_steps={anneal}"],
    )
    results = compare_domain_prior(config, prepared, args.work / "runs", force=True, verbose=False)

    layers = sorted(results["without_prior"])
    print(f"domains: {', '.join(results['domains'])}; at most {results['max_bits']:.2f} bits")
    print("| MoE layer | I(domain; expert) without prior | with prior |")
    print("|---|---:|---:|")
    for layer in layers:
        print(f"| {layer} | {results['without_prior'][layer]:.3f} bits | {results['with_prior'][layer]:.3f} bits |")


if __name__ == "__main__":
    main()
