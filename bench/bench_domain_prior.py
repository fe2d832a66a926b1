"""Domain-guided routing on the demo corpus: I(domain; expert) per MoE layer with and without
`moe.domain_prior`, same corpus, same steps, same seed (issue 4, item 4).

Both runs train genesis-tiny on the demo corpus's domain-tagged chat records; routing is then
measured on the val split with the tags withheld, so the figure shows what the router learned,
not the (annealed-away) prior bonus itself. Prints a markdown table for docs/benchmarks.md.

    .venv/bin/python bench/bench_domain_prior.py --max-steps 150 --work /tmp/bench-prior
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from darkhorse.checkpoint import load_model
from darkhorse.config import RunConfig, load_run_config
from darkhorse.data.demo_corpus import build_demo_corpus, write_jsonl
from darkhorse.data.prepare import prepare
from darkhorse.data.prepared import open_prepared
from darkhorse.errors import DarkhorseError
from darkhorse.train.routing import route_windows
from darkhorse.train.trainer import train


def compare_domain_prior(config: RunConfig, data_dir: Path, out_dir: Path, **train_options: Any) -> dict[str, Any]:
    """Train `config` on the prepared `data_dir` without and with `moe.domain_prior`, then measure
    I(domain; expert) per layer on the val split with tags withheld from routing (the prior is
    annealed away by the end). Returns {"without_prior": {layer: bits}, "with_prior": {...},
    "domains": names, "max_bits": log2(n_domains)}; `train_options` go to `train()`."""
    data = open_prepared(data_dir)
    if data.domains("val") is None or not data.domain_names:
        raise DarkhorseError(f"{data_dir}: the prepared data has no domain tags, so there is no routing to compare")
    tokens = torch.from_numpy(data.tokens("val").astype("int64"))
    domains = torch.from_numpy(data.domains("val").astype("int64"))
    results: dict[str, Any] = {"domains": data.domain_names, "max_bits": math.log2(len(data.domain_names))}
    for label, prior in (("without_prior", False), ("with_prior", True)):
        overrides = [f"model.moe.n_domains={len(data.domain_names)}", f"model.moe.domain_prior={prior}"]
        run_config = load_run_config(base=config.to_dict(), overrides=overrides)
        result = train(run_config, [(data_dir, 1.0)], out_dir / label, **train_options)
        model, _, _ = load_model(result.checkpoint, "cpu")
        routing = route_windows(model, tokens, domains, run_config.train.seq_len, batch_size=8)
        results[label] = routing.mutual_information_by_layer()
    return results


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
