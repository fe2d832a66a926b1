"""GGUF decode speed in llama.cpp for f16, Q8_0 and Q4_K_M of one model, next to darkhorse's own decoder.

One random-init checkpoint per preset (default d20: dim 256 and FFN 768, so every matrix takes real
K-quants) is exported to f16 GGUF with `export_gguf`, then quantized with `quantize_gguf` (llama.cpp's
quantizer). Each file is loaded in llama.cpp (llama-cpp-python) and decodes greedily; the peer in the
same run is darkhorse's KV-cache decoder (`Engine.stream`, torch fp32) on the same checkpoint, the
same prompt and the same thread count. Tokens/s counts decode steps only (the prompt is evaluated
first and not timed). The engines take turns for --repeats rounds and each reports its median, so a
load spike on the shared machine hits all of them alike instead of whichever ran at the time.

Export memory: `export_gguf` to f16 runs in a fresh process and its peak RSS is compared with a fresh
process that only loads the same checkpoint as a model (`load_model`, one fp32 copy): the export
streams one tensor at a time, so it should stay well below that.

Usage: python bench/bench_gguf.py [--presets d20 forge-nano] [--tokens 128] [--threads 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

PROMPT_TOKENS = 16


def make_checkpoint(preset: str, work: Path) -> Path:
    from darkhorse.checkpoint import save_model_checkpoint
    from darkhorse.config import load_run_config
    from darkhorse.data.tokenizer import Tokenizer
    from darkhorse.model import Transformer

    config = load_run_config(preset=preset)
    tokenizer = Tokenizer.train(["alpha beta gamma delta epsilon"] * 20, vocab_size=300)
    tokenizer_file = tokenizer.save(work / f"{preset}-tokenizer.json")
    torch.manual_seed(0)
    return save_model_checkpoint(work / preset, Transformer(config.model), config, tokenizer_file, {"step": 0})


Timer = Callable[[], tuple[int, float]]  # one timed decode: (tokens, seconds)


def llama_cpp_timer(llm, prompt: list[int], tokens: int) -> Timer:
    def run() -> tuple[int, float]:
        llm.reset()
        llm.eval(prompt[:-1])  # the prompt is not part of the decode timing
        produced, start = 0, time.perf_counter()
        for _ in llm.generate(prompt[-1:], top_k=1, temp=0.0, reset=False):
            produced += 1
            if produced == tokens:
                break
        return produced, time.perf_counter() - start

    return run


def darkhorse_timer(model, prompt: list[int], tokens: int) -> Timer:
    from darkhorse.infer.engine import Engine

    def run() -> tuple[int, float]:
        stream = Engine(model).stream(prompt, max_new_tokens=tokens)
        next(stream)  # the first token comes from the prompt's forward pass: not a decode step
        start = time.perf_counter()
        produced = sum(1 for _ in stream)
        return produced, time.perf_counter() - start

    return run


def median_rates(timers: dict[str, Timer], repeats: int) -> dict[str, float]:
    """Median tokens/s per engine, the engines taking turns so that load spikes hit them all alike."""
    rates: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            tokens, seconds = timer()
            rates[name].append(tokens / seconds)
    return {name: statistics.median(values) for name, values in rates.items()}


PEAK_RSS = """
import json, sys, time
from pathlib import Path
checkpoint, out = Path(sys.argv[1]), Path(sys.argv[2])
start = time.perf_counter()
if out.name == "-":
    from darkhorse.checkpoint import load_model
    load_model(checkpoint)
else:
    from darkhorse.interop.gguf import export_gguf
    export_gguf(checkpoint, out, "f16", force=True)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) parent bench process.
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": time.perf_counter() - start, "peak": peak}))
"""


def peak_rss(checkpoint: Path, out: str) -> dict:
    """Seconds and peak RSS of one export (or, with out "-", one model load) in a fresh process."""
    command = [sys.executable, "-c", PEAK_RSS, str(checkpoint), out]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def export_memory_row(preset: str, checkpoint: Path, work: Path) -> str:
    export = peak_rss(checkpoint, str(work / f"{preset}-memory.gguf"))
    load = peak_rss(checkpoint, "-")
    gib = 2**30
    return (
        f"| {preset} | {export['seconds']:.1f} s | {export['peak'] / gib:.2f} GiB | {load['peak'] / gib:.2f} GiB "
        f"| {export['peak'] / load['peak']:.2f}x |"
    )


def bench_preset(preset: str, work: Path, tokens: int, threads: int, repeats: int) -> list[str]:
    import llama_cpp

    from darkhorse.checkpoint import load_model
    from darkhorse.interop.gguf import export_gguf
    from darkhorse.interop.quantize import quantize_gguf

    checkpoint = make_checkpoint(preset, work)
    prompt = [(7 * i + 3) % 256 + 12 for i in range(PROMPT_TOKENS)]
    start = time.perf_counter()
    files = {"f16": export_gguf(checkpoint, work / f"{preset}-f16.gguf", "f16", force=True)}
    notes = {"f16": f"export {time.perf_counter() - start:.1f} s"}
    for qtype in ("Q8_0", "Q4_K_M"):
        report = quantize_gguf(files["f16"], work / f"{preset}-{qtype}.gguf", qtype, force=True, threads=threads)
        files[qtype], notes[qtype] = report.out_path, f"{len(report.fallbacks)} fallbacks"

    model, _, _ = load_model(checkpoint)
    timers = {"darkhorse (torch fp32)": darkhorse_timer(model, prompt, tokens)}
    engines = {}
    for name, path in files.items():
        engines[name] = llama_cpp.Llama(str(path), n_ctx=PROMPT_TOKENS + tokens + 8, n_threads=threads, verbose=False)
        timers[f"llama.cpp {name}"] = llama_cpp_timer(engines[name], prompt, tokens)
    rates = median_rates(timers, repeats)
    for engine in engines.values():
        engine.close()

    sizes = {"darkhorse (torch fp32)": checkpoint / "model.safetensors"} | {
        f"llama.cpp {n}": p for n, p in files.items()
    }
    peer = rates["darkhorse (torch fp32)"]
    return [
        f"| {preset} | {name} | {sizes[name].stat().st_size / 2**20:.1f} | {rate:.1f} | {rate / peer:.2f}x "
        f"| {notes.get(name.removeprefix('llama.cpp '), '-')} |"
        for name, rate in rates.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["d20"])
    parser.add_argument("--tokens", type=int, default=128, help="decode steps timed per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each engine decodes once per round")
    parser.add_argument("--measure", choices=("decode", "memory", "both"), default="both")
    parser.add_argument("--work", type=Path, help="scratch dir (default: a temp dir, removed afterwards)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.measure in ("decode", "both"):
            print("| model | engine / file | size (MiB) | decode tok/s | vs darkhorse | note |")
            print("|---|---|---|---|---|---|")
            for preset in args.presets:
                for row in bench_preset(preset, work, args.tokens, args.threads, args.repeats):
                    print(row, flush=True)
        if args.measure in ("memory", "both"):
            print(
                "\n| model | f16 GGUF export (with imports) | export peak RSS | load_model peak RSS | export / load |"
            )
            print("|---|---|---|---|---|")
            for preset in args.presets:
                checkpoint = work / preset if (work / preset).is_dir() else make_checkpoint(preset, work)
                print(export_memory_row(preset, checkpoint, work), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
