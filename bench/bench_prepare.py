"""`prepare` throughput (MiB/s) and peak memory, next to the `tokenizers` library encoding the same text.

A synthetic domain-tagged + chat JSONL corpus is generated in the work dir at each size (default 25 MiB
and 100 MiB). Each step runs in a fresh process, so its peak RSS is its own:

    prepare (train BPE + tokenize)     full `darkhorse prepare` on each corpus size
    prepare --tokenizer                tokenize-and-write only, with the tokenizer trained above
    tokenizers encode_batch            the library alone on the same framed documents, already in memory,
    tokenizers encode_batch_fast       in the same chunk sizes; only the encode calls are timed

Goals: peak RSS of prepare does not grow with corpus size; `prepare --tokenizer` (reading, parsing,
hashing and writing included) within 1.5x of the library's own batch encoding time.
Usage: python bench/bench_prepare.py [--sizes-mb 25 100] [--work DIR] [--vocab-size 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STEP = """
import json, resource, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
start = time.perf_counter()
result = {}
if args["step"] == "prepare":
    from darkhorse.data.prepare import prepare
    data = prepare([args["corpus"]], args["out"], vocab_size=args["vocab_size"], tokenizer=args.get("tokenizer"),
                   force=True, progress=False)
    result["tokens"] = sum(data.split_info(split)["tokens"] for split in ("train", "val"))
else:
    from tokenizers import Tokenizer
    from darkhorse.data.prepare import CHUNK_BYTES
    from darkhorse.data.readers import InputReader
    from darkhorse.data.tokenizer import BOS, EOS
    tokenizer = Tokenizer.from_file(args["tokenizer"])
    chunks, chunk, size = [], [], 0
    for document in InputReader(Path(args["corpus"])):
        chunk.append(document.text if document.chat else BOS + document.text + EOS)  # the same tokens as prepare
        size += len(document.text)
        if size >= CHUNK_BYTES:
            chunks.append(chunk)
            chunk, size = [], 0
    chunks.append(chunk)
    encode = getattr(tokenizer, args["step"])
    start = time.perf_counter()
    result["tokens"] = sum(len(e.ids) for c in chunks for e in encode(c, add_special_tokens=False))
result["seconds"] = time.perf_counter() - start
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""

SYLLABLES = ["ka", "lo", "mi", "ner", "tos", "ba", "qui", "de", "ran", "vel", "so", "im", "pra", "gu", "tel", "o"]
DOMAINS = ["math", "code", "science", "general"]


def _sentences(rng: random.Random, count: int) -> list[str]:
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(3000)]
    sentences = []
    for _ in range(count):
        picked = rng.choices(words, k=rng.randint(6, 18))
        if rng.random() < 0.3:
            picked.insert(rng.randrange(len(picked)), str(rng.randint(0, 99999)))
        sentences.append(" ".join(picked).capitalize() + rng.choice([".", ".", "?", "!", ":"]))
    return sentences


def make_corpus(path: Path, size_mb: float, seed: int = 0) -> None:
    """Streamed to disk: 70% domain-tagged text records, 30% chat records with reasoning."""
    rng = random.Random(seed)
    pool = _sentences(rng, 20000)
    target = int(size_mb * 2**20)
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            if rng.random() < 0.7:
                text = " ".join(rng.choices(pool, k=rng.randint(5, 40)))
                record = {"domain": rng.choice(DOMAINS), "text": text}
            else:
                record = {
                    "messages": [
                        {"role": "user", "content": " ".join(rng.choices(pool, k=2))},
                        {"role": "assistant", "content": " ".join(rng.choices(pool, k=rng.randint(2, 10)))},
                    ],
                    "reasoning": " ".join(rng.choices(pool, k=rng.randint(2, 8))),
                }
            line = json.dumps(record) + "\n"
            handle.write(line)
            written += len(line.encode("utf-8"))


def run_step(**args) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", STEP, json.dumps(args)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise SystemExit(f"step {args['step']} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[25, 100], help="corpus sizes in MiB")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--work", type=Path, help="work dir (default: a fresh temp dir, removed afterwards)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="darkhorse-bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        smallest, largest = args.sizes_mb[0], args.sizes_mb[-1]
        corpora = {}
        for size in args.sizes_mb:
            corpora[size] = work / f"corpus-{size:g}mib.jsonl"
            make_corpus(corpora[size], size)
        full, reuse = {}, {}
        for size in args.sizes_mb:
            out = work / f"full-{size:g}"
            full[size] = run_step(step="prepare", corpus=str(corpora[size]), out=str(out), vocab_size=args.vocab_size)
        tokenizer = str(work / f"full-{largest:g}" / "tokenizer.json")
        for size in args.sizes_mb:
            out = work / f"reuse-{size:g}"
            reuse[size] = run_step(
                step="prepare", corpus=str(corpora[size]), out=str(out), vocab_size=args.vocab_size, tokenizer=tokenizer
            )
        peers = {
            method: run_step(step=method, corpus=str(corpora[largest]), tokenizer=tokenizer)
            for method in ("encode_batch", "encode_batch_fast")
        }
        for peer in peers.values():
            assert peer["tokens"] == reuse[largest]["tokens"], "the peer must encode exactly the same tokens"

        rows = [(f"prepare (train BPE + tokenize), {size:g} MiB", full[size], size) for size in args.sizes_mb]
        rows += [(f"prepare --tokenizer, {size:g} MiB", reuse[size], size) for size in args.sizes_mb]
        rows += [(f"tokenizers {m} (text in memory), {largest:g} MiB", peers[m], largest) for m in peers]
        print(f"{'step':58} {'seconds':>8} {'MiB/s':>7} {'Mtok/s':>7} {'peak RSS MiB':>12}")
        for name, result, megabytes in rows:
            seconds = result["seconds"]
            print(
                f"{name:58} {seconds:8.1f} {megabytes / seconds:7.2f} {result['tokens'] / seconds / 1e6:7.2f} "
                f"{result['peak_rss_mb']:12.0f}"
            )
        for method, peer in peers.items():
            ratio = reuse[largest]["seconds"] / peer["seconds"]
            print(f"time, prepare --tokenizer / tokenizers {method}: {ratio:.2f}x (goal <= 1.5x)")
        for kind, results in (("prepare", full), ("prepare --tokenizer", reuse)):
            ratio = results[largest]["peak_rss_mb"] / results[smallest]["peak_rss_mb"]
            print(f"peak RSS, {kind}, {largest:g} MiB / {smallest:g} MiB corpus: {ratio:.2f}x (goal ~1x)")
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
