"""Generate text from a checkpoint, streaming tokens as they come.

Greedy decoding (--temperature 0, the default) is deterministic; sampling is reproducible with
--seed. With --chat the prompt is wrapped as a user turn in darkhorse's chat format, or, for an imported
model whose tokenizer lacks darkhorse's chat tokens, in the chat template its tokenizer_config.json holds;
the reply prints its reasoning after `thinking:`, then the answer on a line of its own, never a special token.
`--speculative mtp` (models with an MTP module) drafts with it and prints the same greedy text, then the
drafts' acceptance rate on stderr. On CPU a plain dense fp32 model decodes one prompt in a native step
compiled with g++ on first use (about a second, kept in ~/.cache/darkhorse/native or $DARKHORSE_CACHE);
without a compiler, or with DARKHORSE_NATIVE=0, it decodes in PyTorch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from darkhorse.config import device_arg, number_arg
from darkhorse.errors import DarkhorseError
from darkhorse.infer.sampling import BOUNDS, SamplingOptions

HELP = "generate text from a checkpoint (streams tokens; greedy by default)"
RUNS_DIR = Path("runs")


MAX_NEW_TOKENS = 128


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = MAX_NEW_TOKENS) -> None:
    """Sampling knobs shared by `generate` and `chat`; each command has its own token budget."""
    parser.add_argument(
        "--max-new-tokens",
        type=number_arg(int, gt=0),
        default=max_new_tokens,
        help=f"tokens to generate at most (default {max_new_tokens})",
    )
    parser.add_argument(
        "--temperature",
        type=number_arg(float, **BOUNDS["temperature"]),
        default=0.0,
        help="0 = greedy (default); e.g. 0.7 to sample",
    )
    parser.add_argument(
        "--top-k",
        type=number_arg(int, **BOUNDS["top_k"]),
        default=0,
        help="sample among the k likeliest tokens (0 = off)",
    )
    parser.add_argument(
        "--top-p", type=number_arg(float, **BOUNDS["top_p"]), default=1.0, help="nucleus sampling mass (1.0 = off)"
    )
    parser.add_argument(
        "--repetition-penalty",
        type=number_arg(float, **BOUNDS["repetition_penalty"]),
        default=1.0,
        help=">1 discourages repeats (1.0 = off)",
    )
    parser.add_argument("--seed", type=number_arg(int, **BOUNDS["seed"]), default=None, help="seed for sampling")
    parser.add_argument(
        "--speculative",
        choices=["mtp"],
        help="mtp: the model's MTP module drafts a token per step and the model verifies it; the same "
        "greedy output, faster when drafts are right (genesis models; greedy only, sampling is refused)",
    )
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda, mps (default cpu)")


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The decode options the arguments ask for (stop ids come with the prompt's format)."""
    return SamplingOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        speculative=args.speculative,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint dir (e.g. runs/NAME/final)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument(
        "--chat", action="store_true", help="treat the prompt as a user message in the model's chat format"
    )
    parser.add_argument("--no-think", action="store_true", help="with --chat: ask for an answer without reasoning")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import time

    from darkhorse.checkpoint import load_for_inference
    from darkhorse.infer.engine import Engine
    from darkhorse.infer.generate import prepare_prompt, stream_completion
    from darkhorse.train.device import resolve_device

    options = sampling_options(args)
    model, tokenizer, _ = load_for_inference(args.checkpoint, resolve_device(args.device))
    prompt = prepare_prompt(tokenizer, args.prompt, chat=args.chat, think=not args.no_think)
    engine = Engine(model, tokenizer.vocab_size)
    started = time.perf_counter()
    stream_completion(model, tokenizer, prompt, options, chat=args.chat, engine=engine)
    if args.speculative:
        stats = engine.speculation
        sys.stdout.flush()  # the text first, then the report, also when both go to one pipe
        print(
            f"speculative {args.speculative}: {stats.accepted} of {stats.drafted} drafts accepted "
            f"({stats.acceptance:.0%}), {time.perf_counter() - started:.2f} s",
            file=sys.stderr,
        )
    return 0


def latest_final_checkpoint(runs_dir: Path = RUNS_DIR, preset: str | None = None) -> Path | None:
    """The most recently written `final/` checkpoint under runs_dir (depth one or two); with `preset`
    (a name or an alias such as 1b), the newest one whose run was configured from that preset."""
    finals = [p.parent for p in runs_dir.glob("*/final/model.safetensors")]
    finals += [p.parent for p in runs_dir.glob("*/*/final/model.safetensors")]
    if preset is not None:
        from darkhorse.checkpoint import read_meta
        from darkhorse.config import preset_dict

        wanted = preset_dict(preset)["name"]  # an unknown name is an error listing the presets
        finals = [p for p in finals if read_meta(p)["config"].get("name") == wanted]
    return max(finals, key=lambda p: (p / "model.safetensors").stat().st_mtime, default=None)


def run_latest(prompt: str, preset: str | None = None) -> int:
    """`darkhorse [--params SIZE] --prompt ...`: greedy completion from the newest run (of that preset),
    as the seeds' CLI does."""
    from darkhorse.checkpoint import load_for_inference
    from darkhorse.infer.generate import prepare_prompt, stream_completion

    checkpoint = latest_final_checkpoint(preset=preset)
    if checkpoint is None and preset is not None:
        raise DarkhorseError(
            f"no run of preset {preset} under ./{RUNS_DIR}/*/final; train one with "
            f"`darkhorse train --params {preset} --data DIR --out runs/NAME`, or leave out --params to use "
            "the newest run"
        )
    if checkpoint is None:
        raise DarkhorseError(
            f"no trained model found under ./{RUNS_DIR}/*/final; run `darkhorse demo` or "
            "`darkhorse train --preset tiny-cpu --data DIR --out runs/NAME` first"
        )
    print(f"[{checkpoint}]", file=sys.stderr)
    model, tokenizer, _ = load_for_inference(checkpoint)
    greedy = SamplingOptions(max_new_tokens=MAX_NEW_TOKENS)
    stream_completion(model, tokenizer, prepare_prompt(tokenizer, prompt), greedy)
    return 0
