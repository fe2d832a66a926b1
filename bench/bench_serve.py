"""Serving throughput: `darkhorse serve` (continuous batching) against llama-cpp-python's own OpenAI server,
the same client load on the same model.

One random-init checkpoint (6 layers, dim 256, the issue's 5M shape; decode speed does not depend on the
weights' values) is served by `darkhorse serve` (fp32 torch) and, exported to an f32 GGUF with
`export_gguf`, by `python -m llama_cpp.server`, each in its own process with the same thread count
(`darkhorse serve` decodes on one of them fewer by default, leaving a core to its event loop). The
client (this process, asyncio + httpx) opens N concurrent streamed /v1/completions requests (greedy,
--tokens each, a different prompt per stream) and records when each chunk arrives:

- aggregate tokens/s: all streams' tokens over the wall time from the first request to the last token;
- TTFT: request sent to its first token (p50/p95 over the streams);
- per-token latency: the gap between consecutive tokens of a stream (p50/p95).

The servers take turns for --repeats rounds and each figure is the median of its rounds, so a load spike
on the shared machine hits both alike. llama-cpp-python's server decodes one request at a time (its
requests wait on a lock; started with --interrupt_requests False, or each new request would cut off the
stream in progress), so its aggregate stays near its single-stream rate; darkhorse decodes all
streams in one batched forward per step.

Usage: python bench/bench_serve.py [--streams 1 8 32] [--tokens 64] [--threads 2] [--repeats 3]
       [--decode-threads 2 1] [--no-llama-cpp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "cats",
    "sleep",
    "under",
    "one",
    "warm",
    "red",
    "blanket",
]


def make_checkpoint(work: Path) -> Path:
    from darkhorse.checkpoint import save_model_checkpoint
    from darkhorse.config import ModelConfig, RunConfig
    from darkhorse.data.tokenizer import Tokenizer
    from darkhorse.model import Transformer

    tokenizer = Tokenizer.train([" ".join(WORDS[k:] + WORDS[:k]) for k in range(len(WORDS))] * 20, vocab_size=400)
    tokenizer_file = tokenizer.save(work / "tokenizer.json")
    model = ModelConfig(vocab_size=tokenizer.vocab_size, n_layers=6, dim=256, n_heads=4, n_kv_heads=2, ffn_dim=768,
                        max_seq_len=512)  # fmt: skip
    torch.manual_seed(0)
    config = RunConfig(name="bench-serve", model=model)
    return save_model_checkpoint(work / "final", Transformer(model), config, tokenizer_file, {"step": 0})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process on 127.0.0.1, up once `ready_path` answers."""

    def __init__(self, name: str, command: list[str], port: int, threads: int, ready_path: str) -> None:
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (the server process writes to it until stop)
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise SystemExit(f"{name} did not start:\n{self.log.read().decode()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> tuple[float, list[float]]:
    """(send time, arrival time of each token) of one streamed greedy completion."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    sent, arrivals = time.perf_counter(), []
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"]
                if choice and choice[0].get("text"):
                    arrivals.append(time.perf_counter())
    return sent, arrivals


async def load(url: str, streams: int, tokens: int) -> dict[str, float]:
    prompts = [" ".join(WORDS[k % len(WORDS) :] + WORDS[: k % len(WORDS)])[: 40 + k % 30] for k in range(streams)]
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        runs = await asyncio.gather(*(one_stream(client, url, p, tokens) for p in prompts))
    end = max(arrivals[-1] for _, arrivals in runs if arrivals)
    ttft = [arrivals[0] - sent for sent, arrivals in runs if arrivals]
    gaps = [b - a for _, arrivals in runs for a, b in zip(arrivals, arrivals[1:], strict=False)]
    count = sum(len(arrivals) for _, arrivals in runs)
    return {"tok/s": count / (end - start), "tokens": count, "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "token_p50": pct(gaps, 50), "token_p95": pct(gaps, 95)}  # fmt: skip


def pct(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream (default 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-llama-cpp", action="store_true", help="darkhorse alone")
    parser.add_argument(
        "--decode-threads", type=int, nargs="+", help="a darkhorse server per value of its --threads, taking turns"
    )
    args = parser.parse_args()
    from darkhorse.interop.gguf import export_gguf

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as work:
        checkpoint = make_checkpoint(Path(work))
        servers = []
        for threads in args.decode_threads or [None]:
            port = free_port()
            name, extra = (
                ("darkhorse", [])
                if threads is None
                else (f"darkhorse --threads {threads}", ["--threads", str(threads)])
            )
            servers.append(Server(name, [sys.executable, "-m", "darkhorse", "serve", "--checkpoint", str(checkpoint),
                                         "--port", str(port), "--max-batch", str(max(args.streams)), *extra],
                                  port, args.threads, "/health"))  # fmt: skip
        if not args.no_llama_cpp:
            gguf = export_gguf(checkpoint, Path(work) / "model-f32.gguf", "f32")
            port = free_port()
            servers.append(Server("llama.cpp server", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                                       "--host", "127.0.0.1", "--port", str(port), "--n_threads",
                                                       str(args.threads), "--n_ctx", "512",
                                                       "--interrupt_requests", "False"],
                                  port, args.threads, "/v1/models"))  # fmt: skip
        try:
            results: dict[tuple[str, int], list[dict[str, float]]] = {}
            for server in servers:  # warm-up: first requests pay for lazy initialisation
                asyncio.run(load(server.url, 2, 8))
            for _ in range(args.repeats):
                for streams in args.streams:
                    for server in servers:
                        results.setdefault((server.name, streams), []).append(
                            asyncio.run(load(server.url, streams, args.tokens))
                        )
        finally:
            for server in servers:
                server.stop()
    load_avg = os.getloadavg()[0]
    print(f"{args.tokens} greedy tokens per stream, {args.threads} threads per server, medians of {args.repeats} "
          f"interleaved rounds, load average {load_avg:.1f}")  # fmt: skip
    print("| server | streams | aggregate tok/s | vs 1 stream | TTFT p50 / p95 (ms) | per-token p50 / p95 (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for server in servers:
        single = None
        for streams in args.streams:
            runs = results[(server.name, streams)]
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            single = single or median["tok/s"]
            print(f"| {server.name} | {streams} | {median['tok/s']:.0f} | {median['tok/s'] / single:.2f}x | "
                  f"{median['ttft_p50'] * 1e3:.0f} / {median['ttft_p95'] * 1e3:.0f} | "
                  f"{median['token_p50'] * 1e3:.1f} / {median['token_p95'] * 1e3:.1f} |")  # fmt: skip
    if not args.no_llama_cpp:
        *ours, theirs = servers
        for server in ours:
            for streams in args.streams:
                rate, peer = (
                    statistics.median(r["tok/s"] for r in results[(s.name, streams)]) for s in (server, theirs)
                )
                print(f"{streams} streams: {server.name} / llama.cpp server aggregate = {rate / peer:.2f}x")


if __name__ == "__main__":
    main()
