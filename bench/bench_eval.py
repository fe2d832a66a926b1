"""Eval throughput: batched greedy scoring of the demo's 600 held-out problems, darkhorse's Engine against
transformers' `generate` on the HF export of the same checkpoint, same batches, same prompts, one run.

darkhorse side: `eval.exact_match.evaluate_exact_match` (what `darkhorse eval` and `darkhorse demo` run):
prompts rendered by infer/prompting.py, sorted by length, `--batch-size` at a time through `Engine`.
transformers side: the same token ids in the same batches, left-padded with an attention mask,
`model.generate(do_sample=False, max_new_tokens=N, eos_token_id=<the chat stop ids>)`, decoded and
scored by the same `split_reply` + exact match. The darkhorse time includes rendering and tokenizing the
prompts and decoding and scoring the replies; the transformers time covers padding, `generate` and cutting
at the stop id, not tokenizing or scoring. Each side runs `--repeats` times, interleaved; the result gives
each side's fastest and median run and the speedup of each (on a shared machine read both: noise only ever
slows a run down, but it can fall on one side's runs more than the other's), the 1-minute load average
before and after, and whether the two sides give the same answers.

The model is `--preset` (default demo-cpu, the dense demo model: it exports as a Llama) at random init
with a tokenizer trained on the demo corpus, unless `--checkpoint` names a trained one (e.g. the one
`darkhorse demo --preset demo-cpu` writes). A random model rarely writes a stop token, so every row
runs the full --max-new-tokens on both sides: the same work.

`--clock cpu` times process CPU time instead of wall time (with `--threads 1` on a loaded machine: it leaves
out the time the process waits for a core).

Usage: python bench/bench_eval.py [--checkpoint DIR] [--batch-size 64] [--max-new-tokens 64] [--device cpu]
                                 [--threads N] [--repeats 3] [--clock cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_checkpoint(preset: str, work: Path) -> Path:
    from darkhorse.checkpoint import save_model_checkpoint
    from darkhorse.config import load_run_config
    from darkhorse.data.chat_format import render_conversation
    from darkhorse.data.demo_corpus import build_demo_corpus
    from darkhorse.data.tokenizer import Tokenizer
    from darkhorse.model import Transformer

    corpus = build_demo_corpus(seed=1, train_size=3000, heldout_per_skill=1)
    texts = [render_conversation(e.to_record()["messages"], e.reasoning) for e in corpus.train]
    tokenizer_file = Tokenizer.train(texts, vocab_size=512).save(work / "tokenizer.json")
    config = load_run_config(preset=preset, overrides=["model.vocab_size=512"])
    torch.manual_seed(0)
    return save_model_checkpoint(work / "ckpt", Transformer(config.model), config, tokenizer_file, {"step": 0})


def run_transformers(model, tokenizer, prompts: list[list[int]], order: list[int], args) -> tuple[list, float]:
    """Greedy `generate` over the same batches; returns (continuations in prompt order, seconds)."""
    from darkhorse.infer.prompting import chat_stop_ids

    stop_ids = sorted(chat_stop_ids(tokenizer))
    pad = tokenizer.pad_id
    outputs: list[list[int]] = [[] for _ in prompts]
    started = args.clock()
    for first in range(0, len(order), args.batch_size):
        chunk = order[first : first + args.batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, index in enumerate(chunk):
            ids[row, width - len(prompts[index]) :] = torch.tensor(prompts[index])
            mask[row, width - len(prompts[index]) :] = 1
        with torch.inference_mode():
            generated = model.generate(
                input_ids=ids.to(args.device),
                attention_mask=mask.to(args.device),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=pad,
            )
        for row, index in enumerate(chunk):
            new = generated[row, width:].tolist()
            ends = [k for k, token in enumerate(new) if token in stop_ids]
            outputs[index] = new[: ends[0] + 1] if ends else new
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return outputs, args.clock() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a trained dense checkpoint (default: random-init --preset)")
    parser.add_argument("--preset", default="demo-cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per side (default 3)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time (for --threads 1 on a busy box)"
    )
    args = parser.parse_args()
    clock_name, args.clock = args.clock, time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from darkhorse.checkpoint import load_for_inference
    from darkhorse.data.demo_corpus import build_demo_corpus
    from darkhorse.eval.exact_match import evaluate_exact_match, is_exact_match, split_record
    from darkhorse.infer.prompting import chat_stop_ids, render_chat_prompt, split_reply
    from darkhorse.interop.export import export_hf

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as work:
        work = Path(work)
        checkpoint = args.checkpoint or make_checkpoint(args.preset, work)
        hf_dir = export_hf(checkpoint, work / "hf")
        model, tokenizer, _ = load_for_inference(checkpoint, args.device)
        records = [e.to_record() for e in build_demo_corpus(seed=0, train_size=0, heldout_per_skill=100).heldout]

        thinks = [bool(record.get("reasoning")) for record in records]
        prompts = [
            tokenizer.encode(render_chat_prompt(tokenizer, split_record(record)[0], think=think))
            for record, think in zip(records, thinks, strict=True)
        ]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # the batches evaluate_exact_match makes
        peer = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
        peer = peer.to(args.device).eval()

        evaluate_exact_match(model, tokenizer, records[:8], max_new_tokens=4, batch_size=8)  # warm-up
        load_before = os.getloadavg()[0]
        ours_runs, theirs_runs = [], []
        for _ in range(args.repeats):
            started = args.clock()
            report = evaluate_exact_match(
                model, tokenizer, records, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
            )
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            ours_runs.append(args.clock() - started)
            theirs, seconds = run_transformers(peer, tokenizer, prompts, order, args)
            theirs_runs.append(seconds)
        load_after = os.getloadavg()[0]
        ours_seconds, theirs_seconds = min(ours_runs), min(theirs_runs)
        ours_median, theirs_median = statistics.median(ours_runs), statistics.median(theirs_runs)
        ours_tokens = sum(outcome.tokens for outcome in report.outcomes)
        stop_ids = chat_stop_ids(tokenizer)
        theirs_tokens = sum(len(continuation) for continuation in theirs)
        agree = correct = 0
        for outcome, continuation, think in zip(report.outcomes, theirs, thinks, strict=True):
            if continuation and continuation[-1] in stop_ids:
                continuation = continuation[:-1]
            _, answer = split_reply(tokenizer, tokenizer.decode(continuation), opened_think=think)
            agree += answer == outcome.predicted
            correct += is_exact_match(answer, outcome.expected)

    result = {
        "model": str(args.checkpoint) if args.checkpoint else f"{args.preset} (random init)",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "clock": clock_name,
        "problems": len(records),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "darkhorse": {
            "seconds": round(ours_seconds, 2),
            "median_seconds": round(ours_median, 2),
            "tokens": ours_tokens,
            "tokens_per_s": round(ours_tokens / ours_seconds, 1),
            "accuracy": report.overall().accuracy,
        },  # fmt: skip
        "transformers": {
            "seconds": round(theirs_seconds, 2),
            "median_seconds": round(theirs_median, 2),
            "tokens": theirs_tokens,
            "tokens_per_s": round(theirs_tokens / theirs_seconds, 1),
            "accuracy": correct / len(records),
        },  # fmt: skip
        "speedup": round(theirs_seconds / ours_seconds, 2),
        "speedup_median": round(theirs_median / ours_median, 2),
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "same_answers": f"{agree}/{len(records)}",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
