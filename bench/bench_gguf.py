"""GGUF decode speed in llama.cpp for f16, Q8_0 and Q4_K_M of one model, next to darkhorse's own decoder.

One random-init checkpoint per preset (default d20: dim 256 and FFN 768, so every matrix takes real
K-quants) is exported to f16 GGUF with `export_gguf`, then quantized with `quantize_gguf` (llama.cpp's
quantizer). Each file is loaded in llama.cpp (llama-cpp-python) and decodes greedily; the peer in the
same run is darkhorse's KV-cache decoder (`generate_tokens`, torch fp32) on the same checkpoint, the
same prompt and the same thread count. Tokens/s counts decode steps only (the prompt is evaluated
first and not timed) and is the best of --repeats runs, since the machine is shared and noisy.

Usage: python bench/bench_gguf.py [--presets d20 forge-nano] [--tokens 128] [--threads 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

PROMPT_TOKENS = 16


def make_checkpoint(preset: str, work: Path) -> Path:
    from darkhorse.config import load_run_config
    from darkhorse.data.tokenizer import Tokenizer
    from darkhorse.model import Transformer
    from darkhorse.train.checkpoint import save_model_checkpoint

    config = load_run_config(preset=preset)
    tokenizer = Tokenizer.train(["alpha beta gamma delta epsilon"] * 20, vocab_size=300)
    tokenizer_file = tokenizer.save(work / f"{preset}-tokenizer.json")
    torch.manual_seed(0)
    return save_model_checkpoint(work / preset, Transformer(config.model), config, tokenizer_file, {"step": 0})


def best_rate(run, repeats: int) -> float:
    """Best tokens/s over `repeats` calls of `run() -> (tokens, seconds)`."""
    return max(tokens / seconds for tokens, seconds in (run() for _ in range(repeats)))


def llama_cpp_rate(path: Path, prompt: list[int], tokens: int, threads: int, repeats: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=PROMPT_TOKENS + tokens + 8, n_threads=threads, verbose=False)

    def run() -> tuple[int, float]:
        llm.reset()
        llm.eval(prompt[:-1])  # the prompt is not part of the decode timing
        produced, start = 0, time.perf_counter()
        for _ in llm.generate(prompt[-1:], top_k=1, temp=0.0, reset=False):
            produced += 1
            if produced == tokens:
                break
        return produced, time.perf_counter() - start

    try:
        return best_rate(run, repeats)
    finally:
        llm.close()


def darkhorse_rate(checkpoint: Path, prompt: list[int], tokens: int, repeats: int) -> float:
    from darkhorse.infer.generate import generate_tokens
    from darkhorse.train.checkpoint import load_model

    model, _, _ = load_model(checkpoint)

    def run() -> tuple[int, float]:
        stream = generate_tokens(model, prompt, max_new_tokens=tokens)
        next(stream)  # the first token comes from the prompt's forward pass: not a decode step
        start = time.perf_counter()
        produced = sum(1 for _ in stream)
        return produced, time.perf_counter() - start

    return best_rate(run, repeats)


def bench_preset(preset: str, work: Path, tokens: int, threads: int, repeats: int) -> list[str]:
    from darkhorse.interop.gguf import export_gguf
    from darkhorse.interop.quantize import quantize_gguf

    checkpoint = make_checkpoint(preset, work)
    prompt = [(7 * i + 3) % 256 + 12 for i in range(PROMPT_TOKENS)]
    start = time.perf_counter()
    f16 = export_gguf(checkpoint, work / f"{preset}-f16.gguf", "f16", force=True)
    export_seconds = time.perf_counter() - start
    files = {"f16": f16}
    fallbacks = {}
    for qtype in ("Q8_0", "Q4_K_M"):
        report = quantize_gguf(f16, work / f"{preset}-{qtype}.gguf", qtype, force=True, threads=threads)
        files[qtype], fallbacks[qtype] = report.out_path, len(report.fallbacks)

    peer = darkhorse_rate(checkpoint, prompt, tokens, repeats)
    rows = [f"| {preset} | darkhorse (torch fp32) | {(checkpoint / 'model.safetensors').stat().st_size / 2**20:.1f} "
            f"| {peer:.1f} | 1.00x | - |"]  # fmt: skip
    for name, path in files.items():
        rate = llama_cpp_rate(path, prompt, tokens, threads, repeats)
        note = f"{fallbacks[name]} fallbacks" if name in fallbacks else f"export {export_seconds:.1f} s"
        rows.append(
            f"| {preset} | llama.cpp {name} | {path.stat().st_size / 2**20:.1f} | {rate:.1f} | {rate / peer:.2f}x "
            f"| {note} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["d20"])
    parser.add_argument("--tokens", type=int, default=128, help="decode steps timed per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, help="scratch dir (default: a temp dir, removed afterwards)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print("| model | engine / file | size (MiB) | decode tok/s | vs darkhorse | note |")
        print("|---|---|---|---|---|---|")
        for preset in args.presets:
            for row in bench_preset(preset, work, args.tokens, args.threads, args.repeats):
                print(row, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
