"""Single-stream decode speed: darkhorse's `Engine` (its native batch-1 step, and the eager `DenseForward`
as "darkhorse eager") against llama.cpp on the f32 and f16 GGUF of the same
model and against transformers' `generate` on its HF export, same prompt, same thread count, one run.

The model (issue 13's): 6 layers, dim 256, 4 query / 2 KV heads, FFN 768, vocab 512 (~5M parameters),
at random init with a tokenizer trained on the demo corpus, unless `--checkpoint` names a trained one.
Weights do not change the work: every engine decodes exactly `--tokens` greedy tokens (no stop token).
Tokens/s counts decode steps only: the prompt is evaluated first and not timed (llama.cpp: `eval` of the
prompt, then `generate`; darkhorse: the first streamed token comes from the prompt's forward; transformers:
`generate` of N + 1 tokens minus `generate` of 1, both timed in the same round). The engines take turns for
`--repeats` rounds and each reports its median, so a load spike on the shared machine hits all alike.
`--clock cpu` times process CPU time instead of wall time: with `--threads 1` on a loaded machine it leaves
out the time the process waits for a core (with more threads it would count their spin-waits).

Usage: python bench/bench_decode.py [--checkpoint DIR] [--tokens 128] [--threads 2] [--repeats 5] [--clock cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

PROMPT = "<|user|>What is 15 * 23?<|assistant|>"
MODEL = ["model.n_layers=6", "model.dim=256", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=768"]


def make_checkpoint(work: Path) -> Path:
    from darkhorse.checkpoint import save_model_checkpoint
    from darkhorse.config import load_run_config
    from darkhorse.data.chat_format import render_conversation
    from darkhorse.data.demo_corpus import build_demo_corpus
    from darkhorse.data.tokenizer import Tokenizer
    from darkhorse.model import Transformer

    corpus = build_demo_corpus(seed=1, train_size=2000, heldout_per_skill=1)
    texts = [render_conversation(e.to_record()["messages"], e.reasoning) for e in corpus.train]
    tokenizer_file = Tokenizer.train(texts, vocab_size=512).save(work / "tokenizer.json")
    config = load_run_config(preset="demo-cpu", overrides=[*MODEL, "model.vocab_size=512", "model.max_seq_len=512"])
    torch.manual_seed(0)
    return save_model_checkpoint(work / "ckpt", Transformer(config.model), config, tokenizer_file, {"step": 0})


Timer = Callable[[], float]  # one timed decode of --tokens tokens: seconds


def darkhorse_timer(model, prompt: list[int], tokens: int, clock: Callable[[], float], native: bool) -> Timer:
    from darkhorse.infer.engine import Engine
    from darkhorse.infer.native_step import NativeStep

    engine = Engine(model)

    def run() -> float:
        stream = engine.stream(prompt, max_new_tokens=tokens + 1)
        with mock.patch.object(NativeStep, "supports", NativeStep.supports if native else lambda *_: False):
            next(stream)  # the step is picked here; the first token comes from the prompt's forward pass
        start = clock()
        produced = sum(1 for _ in stream)
        assert produced == tokens, produced
        return clock() - start

    return run


def llama_cpp_timer(llm, prompt: list[int], tokens: int, clock: Callable[[], float]) -> Timer:
    def run() -> float:
        llm.reset()
        llm.eval(prompt)  # the prompt is not part of the decode timing
        start = clock()
        for produced, _ in enumerate(llm.generate([], top_k=1, temp=0.0, reset=False), start=1):
            if produced == tokens:
                break
        return clock() - start

    return run


def transformers_timer(model, prompt: list[int], tokens: int, clock: Callable[[], float]) -> Timer:
    ids = torch.tensor([prompt])

    def generate(new: int) -> float:
        start = clock()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        assert out.shape[1] == len(prompt) + new
        return clock() - start

    return lambda: generate(tokens + 1) - generate(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained dense checkpoint (default: random init)")
    parser.add_argument("--tokens", type=int, default=128, help="decode steps timed per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each engine decodes once per round")
    parser.add_argument("--skip", nargs="*", default=[], help="engines to leave out (by name prefix)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    import llama_cpp
    import transformers

    from darkhorse.checkpoint import load_for_inference
    from darkhorse.infer import native_step
    from darkhorse.interop.export import export_hf
    from darkhorse.interop.gguf import export_gguf

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as work:
        work = Path(work)
        checkpoint = args.checkpoint or make_checkpoint(work)
        model, tokenizer, _ = load_for_inference(checkpoint, "cpu")
        prompt = tokenizer.encode(PROMPT)
        timers: dict[str, Timer] = {
            "darkhorse": darkhorse_timer(model, prompt, args.tokens, clock, native=True),
            "darkhorse eager": darkhorse_timer(model, prompt, args.tokens, clock, native=False),
        }
        engines = []
        for outtype in ("f32", "f16"):
            path = export_gguf(checkpoint, work / f"model-{outtype}.gguf", outtype, force=True)
            llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + args.tokens + 8, n_threads=args.threads, verbose=False)
            engines.append(llm)
            timers[f"llama.cpp {outtype}"] = llama_cpp_timer(llm, prompt, args.tokens, clock)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(export_hf(checkpoint, work / "hf")))
        timers["transformers generate"] = transformers_timer(hf.float().eval(), prompt, args.tokens, clock)
        timers = {n: t for n, t in timers.items() if not any(n.startswith(s) for s in args.skip)}

        for timer in timers.values():  # warm-up
            timer()
        load_before = os.getloadavg()[0]
        seconds: dict[str, list[float]] = {name: [] for name in timers}
        for _ in range(args.repeats):
            for name, timer in timers.items():
                seconds[name].append(timer())
        load_after = os.getloadavg()[0]
        for llm in engines:
            llm.close()

    assert native_step.library() is not None, "the native step did not build: the darkhorse row would be eager"
    rates = {name: args.tokens / statistics.median(values) for name, values in seconds.items()}
    ours = rates["darkhorse"]
    result = {
        "model": str(args.checkpoint) if args.checkpoint else "6 layers, dim 256, vocab 512 (random init)",
        "threads": args.threads,
        "clock": args.clock,
        "tokens": args.tokens,
        "prompt_tokens": len(prompt),
        "repeats": args.repeats,
        "tokens_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "darkhorse_vs": {name: round(ours / rate, 2) for name, rate in rates.items() if name != "darkhorse"},
        "load_average": [round(load_before, 2), round(load_after, 2)],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
