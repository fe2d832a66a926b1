"""Training throughput: darkhorse's trainer vs. transformers' LlamaForCausalLM, same run, same batches.

For each preset and dtype, both models are built from one config (same dims, GQA, tied
embeddings, no biases, RoPE theta), trained with fused AdamW on the same batches from our loader,
with the same clipping and autocast. Steps alternate between the two models so that load on a
shared machine hits both alike; the median step time gives tokens/s, and their ratio is the
figure to watch (goal: darkhorse >= 1.2x). MFU uses our FLOPs-per-token and the device's peak
(on CPU a measured matmul peak at the training dtype).

    .venv/bin/python bench/bench_train.py --presets tiny-cpu d20 --dtypes fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from darkhorse.config import RunConfig, load_run_config
from darkhorse.train.peak_flops import peak_flops
from darkhorse.train.trainer import Trainer


def write_random_prepared(folder: Path, vocab_size: int, tokens: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.random.default_rng(0).integers(0, vocab_size, size=tokens).astype("<u4")
    ids.tofile(folder / "train.bin")
    meta = {"vocab_size": vocab_size, "tokenizer_sha256": "bench", "splits": {"train": {"tokens": tokens}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def llama_twin(config: RunConfig) -> LlamaForCausalLM:
    """transformers' Llama with exactly our dense model's shape."""
    model = config.model
    hf_config = LlamaConfig(
        vocab_size=model.padded_vocab_size,
        hidden_size=model.dim,
        intermediate_size=model.ffn_dim,
        num_hidden_layers=model.n_layers,
        num_attention_heads=model.n_heads,
        num_key_value_heads=model.n_kv_heads,
        max_position_embeddings=model.max_seq_len,
        rope_theta=model.rope_theta,
        rms_norm_eps=model.norm_eps,
        tie_word_embeddings=model.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf_config)


def bench(preset: str, dtype: str, batch_size: int, seq_len: int, steps: int, warmup: int, work: Path) -> dict:
    overrides = [
        f"train.dtype={dtype}", f"train.batch_size={batch_size}", f"train.seq_len={seq_len}",
        "train.optimizer=adamw", "train.grad_accum=1", "train.eval_steps=0", f"train.max_steps={steps + warmup}",
    ]  # fmt: skip
    config = load_run_config(preset, overrides=overrides)
    data = write_random_prepared(work / f"{preset}-data", config.model.vocab_size, 200_000)
    ours = Trainer(config, [(data, 1.0)], work / f"{preset}-{dtype}-run", force=True, verbose=False)

    torch.manual_seed(0)
    theirs = llama_twin(ours.config)
    assert sum(p.numel() for p in theirs.parameters()) == ours.model.num_params(), "models differ in size"
    theirs_optimizer = torch.optim.AdamW(
        theirs.parameters(), lr=config.train.lr, betas=(config.train.beta1, config.train.beta2), fused=True
    )

    def our_step(step: int) -> None:
        ours.train_step()

    def their_step(step: int) -> None:
        batch = ours.loader.batch(step, 0)
        with ours._autocast():
            loss = theirs(input_ids=batch.inputs, labels=batch.inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), config.train.grad_clip)
        theirs_optimizer.step()
        theirs_optimizer.zero_grad(set_to_none=True)

    timings: dict[str, list[float]] = {"darkhorse": [], "transformers": []}
    for step in range(warmup + steps):
        for name, run_step in (("darkhorse", our_step), ("transformers", their_step)):
            start = time.perf_counter()
            run_step(step)
            if step >= warmup:
                timings[name].append(time.perf_counter() - start)

    tokens = batch_size * seq_len
    peak = peak_flops(ours.device, dtype)
    result = {"preset": preset, "dtype": dtype, "batch": batch_size, "seq_len": seq_len, "steps": steps}
    for name, times in timings.items():
        rate = tokens / statistics.median(times)
        result[f"{name}_tok_s"] = rate
        result[f"{name}_mfu"] = rate * ours.flops_per_token / peak
    result["ratio"] = result["darkhorse_tok_s"] / result["transformers_tok_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny-cpu", "d20"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = f"{'preset':<10}{'dtype':<6}{'tokens':>8}{'darkhorse tok/s':>17}{'HF tok/s':>10}{'ratio':>7}{'MFU':>7}"
    print(header)
    with tempfile.TemporaryDirectory() as work:
        for preset in args.presets:
            for dtype in args.dtypes:
                r = bench(preset, dtype, args.batch_size, args.seq_len, args.steps, args.warmup, Path(work))
                print(
                    f"{preset:<10}{dtype:<6}{args.batch_size * args.seq_len:>8}{r['darkhorse_tok_s']:>17.0f}"
                    f"{r['transformers_tok_s']:>10.0f}{r['ratio']:>6.2f}x{100 * r['darkhorse_mfu']:>6.1f}%",
                    flush=True,
                )


if __name__ == "__main__":
    main()
