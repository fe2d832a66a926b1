"""LoRA fine-tuning speed and memory: darkhorse against transformers + PEFT, and LoRA against full fine-tuning.

One small Mixtral-architecture model (transformers builds it from a config; darkhorse imports it) is
trained with the same LoRA targets (attention q/k/v/o, router, routed experts' gate/up/down), ranks,
AdamW settings and token batches by

  darkhorse   the model from `darkhorse.interop.hf_import`, LoRA from `darkhorse.finetune.lora`
  peft        transformers' MixtralForCausalLM with peft's LoRA (target_modules + target_parameters)
  full        darkhorse training every weight (the `train --init-from` path), for memory and checkpoint size

each in a fresh child process (peak RSS is per process), fp32 on CPU by default, with fused AdamW on
every side (what both tools train with on CPU: darkhorse's `build_optimizers`, and transformers'
Trainer, whose default `optim` is `adamw_torch_fused`). Reported: tokens/s over the timed steps (wall
clock), tokens per CPU-second of the worker process, peak RSS, and the bytes a checkpoint of what trains
takes (weights/adapters + AdamW state). On a machine other jobs load, separate processes meet different
load, so a fourth worker also runs darkhorse and peft alternating step by step in one process and
reports their ratio, which load skews far less (the two share one allocator there, which is not free of
effects either: docs/experiments.md, 2026-11-30).

    python bench/bench_lora.py                         # default shape, 1 thread
    python bench/bench_lora.py --hidden 512 --layers 4 --steps 10 --threads 2
    python bench/bench_lora.py --repeats 5 --steps 12    # medians of 5 interleaved runs per side
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_model(folder: Path, args: argparse.Namespace) -> None:
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
        num_local_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=args.seq_len,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(str(folder))
    from darkhorse.data.tokenizer import Tokenizer  # import needs one; the batches are random ids

    Tokenizer.train(["a small corpus for a tokenizer"] * 4, vocab_size=300).save(folder / "tokenizer.json")


def batches(args: argparse.Namespace) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=generator)
        for _ in range(args.warmup + args.steps)
    ]


def checkpoint_bytes(tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as scratch:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, f"{scratch}/weights.safetensors")
        torch.save(optimizer.state_dict(), f"{scratch}/optimizer.pt")
        return sum(p.stat().st_size for p in Path(scratch).iterdir())


def trainer(kind: str, folder: Path, args: argparse.Namespace):
    """One side ready to train: (step(batch) -> loss, its trainable tensors, its optimizer)."""
    torch.manual_seed(0)
    if kind == "peft":
        import peft
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        config = peft.LoraConfig(
            r=args.r,
            lora_alpha=2 * args.r,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            rank_pattern={r".*\.gate_up_proj": 2 * args.r},
            alpha_pattern={r".*\.gate_up_proj": 4 * args.r},
        )  # fmt: skip  (gate and up each get rank r, as in darkhorse: the fused gate_up_proj has 2r)
        model = peft.get_peft_model(model, config).train()

        def loss_of(batch: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=batch[:, :-1]).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
    else:
        from darkhorse.checkpoint import load_model
        from darkhorse.finetune.lora import LoRASpec, apply_lora
        from darkhorse.interop.hf_import import import_hf

        imported = import_hf(folder, folder.parent / f"imported-{kind}-{os.getpid()}")
        model, _, _ = load_model(imported)
        if kind == "darkhorse":
            apply_lora(model, LoRASpec(("attention", "router", "routed_experts"), r=args.r, expert_r=args.r,
                                       router_r=args.r, alpha=2 * args.r))  # fmt: skip
        model.train()

        def loss_of(batch: torch.Tensor) -> torch.Tensor:  # the trainer's call: the fused head loss
            return model(batch[:, :-1], batch[:, 1:], return_logits=False).loss

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-4, weight_decay=0.0, fused=True)

    def step(batch: torch.Tensor) -> float:
        loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, trainable, optimizer


def worker(kind: str, folder: Path, args: argparse.Namespace) -> dict:
    """One side in this process, or with `pair` darkhorse and peft alternating step by step in it, so
    that whatever else loads the machine hits both alike (its peak RSS is the two sides' together, so
    memory comes from the single-side workers)."""
    torch.set_num_threads(args.threads)
    sides = {k: trainer(k, folder, args) for k in (("darkhorse", "peft") if kind == "pair" else (kind,))}
    wall, cpu, first_loss = dict.fromkeys(sides, 0.0), dict.fromkeys(sides, 0.0), {}
    for i, batch in enumerate(batches(args)):
        for side, (step, _, _) in sides.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            loss = step(batch)
            if i >= args.warmup:
                wall[side] += time.perf_counter() - started
                cpu[side] += time.process_time() - started_cpu
            first_loss.setdefault(side, loss)
    if kind == "pair":
        return {
            "kind": kind,
            "tokens_per_s_ratio": wall["peft"] / wall["darkhorse"],
            "tokens_per_cpu_s_ratio": cpu["peft"] / cpu["darkhorse"],
        }
    tokens = args.steps * args.batch * args.seq_len
    _, trainable, optimizer = sides[kind]
    return {
        "kind": kind,
        "tokens_per_s": tokens / wall[kind],
        "tokens_per_cpu_s": tokens / cpu[kind],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in trainable.values()),
        "checkpoint_bytes": checkpoint_bytes(trainable, optimizer),
        "first_loss": first_loss[kind],
    }


def median_run(done: list[dict]) -> dict:
    """Per-field median over the repeats of one side (tokens/s and peak RSS each on their own)."""
    middle = len(done) // 2
    return {
        key: sorted(r[key] for r in done)[middle] if isinstance(done[0][key], float) else done[0][key]
        for key in done[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="fresh child processes per side, interleaved")
    parser.add_argument("--worker", choices=["darkhorse", "peft", "full", "pair"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model_dir, args)))
        return
    runs: dict[str, list[dict]] = {kind: [] for kind in ("darkhorse", "peft", "full", "pair")}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "mixtral"
        build_model(folder, args)
        for _ in range(args.repeats):  # interleaved, so load on a shared machine hits every side alike
            for kind in runs:
                command = [sys.executable, __file__, *sys.argv[1:], "--worker", kind, "--model-dir", str(folder)]
                done = subprocess.run(command, capture_output=True, text=True, env=os.environ, check=False)
                if done.returncode:
                    raise SystemExit(f"{kind} worker failed:\n{done.stderr[-2000:]}")
                runs[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {kind: median_run(done) for kind, done in runs.items()}
    dh, pf, full, pair = results["darkhorse"], results["peft"], results["full"], results.pop("pair")
    print(json.dumps(results, indent=1))
    for key in ("tokens_per_s", "tokens_per_cpu_s"):
        pairs = zip(runs["darkhorse"], runs["peft"], strict=True)
        print(f"darkhorse / peft {key}, separate processes, per repeat:", *(f"{d[key] / p[key]:.2f}" for d, p in pairs))
        print(f"darkhorse / peft {key}, alternating in one process, per repeat:", *(
            f"{r[key + '_ratio']:.2f}" for r in runs["pair"]))  # fmt: skip
    print(
        f"\nMixtral hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-2, r {args.r}, "
        f"batch {args.batch}x{args.seq_len}, {args.threads} thread(s), fp32 CPU; medians of {args.repeats} "
        f"interleaved run(s) per side; load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'':12}{'tokens/s':>10}{'tokens/CPU-s':>14}{'peak RSS MiB':>14}{'trainable':>12}{'ckpt MiB':>10}")
    for kind, r in results.items():
        print(
            f"{kind:12}{r['tokens_per_s']:>10.0f}{r['tokens_per_cpu_s']:>14.0f}{r['peak_rss_mib']:>14.0f}"
            f"{r['trainable']:>12,}{r['checkpoint_bytes'] / 2**20:>10.2f}"
        )
    print(
        f"darkhorse / peft: {dh['tokens_per_s'] / pf['tokens_per_s']:.2f}x tokens/s, "
        f"{dh['tokens_per_cpu_s'] / pf['tokens_per_cpu_s']:.2f}x tokens/CPU-s, "
        f"{dh['peak_rss_mib'] / pf['peak_rss_mib']:.2f}x peak RSS; LoRA / full: "
        f"{dh['peak_rss_mib'] / full['peak_rss_mib']:.2f}x peak RSS, "
        f"{dh['checkpoint_bytes'] / full['checkpoint_bytes']:.3f}x checkpoint bytes"
    )
    print(
        f"darkhorse / peft alternating step by step in one process: {pair['tokens_per_s_ratio']:.2f}x tokens/s, "
        f"{pair['tokens_per_cpu_s_ratio']:.2f}x tokens/CPU-s"
    )


if __name__ == "__main__":
    main()
