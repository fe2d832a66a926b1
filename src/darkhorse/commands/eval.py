"""Evaluate a checkpoint, or a Hugging Face model directory (imported on the fly), in up to three parts.

  darkhorse eval --checkpoint runs/mine/final                        the suite (the default part)
  darkhorse eval --checkpoint runs/mine/final --text data/mine       val-split perplexity and bits/byte
  darkhorse eval --checkpoint runs/mine/final --text notes.txt       the same on a raw file
  darkhorse eval --checkpoint runs/mine/final --tasks qa.jsonl --match contains
  darkhorse eval --checkpoint runs/a/final --compare runs/b/final --suite --tasks qa.jsonl --json eval.json

--suite: eight fixed prompts (arithmetic, a word problem, a haiku, a capital, sorting, ...) answered one
at a time, showing whether the model reasoned, its reasoning, its answer, tokens and seconds; those with
a checkable answer are scored. Then --suite-per-skill held-out problems of each skill of `darkhorse
demo`'s corpus, scored by exact match.

--text FILE|PREPARED_DIR: perplexity and bits per byte. Bytes are counted per target token (its UTF-8
bytes; special tokens 0), so chat data scored on the assistant's part (as trained; --all-tokens scores
every token) gets an exact figure too. Each document is scored on its own in windows of the model's
context (--window), as lm-evaluation-harness's loglikelihood_rolling does; per domain for tagged data.
A MoE model on a tagged prepared dir also gets its routing read with the tags withheld: per layer
I(domain; expert), its share of H(domain), and with domain_routing=isolated the share of tokens and of
documents routed to their own domain's expert group. Each document is read from its start in rows of
the model's context (at most 512) that slide by half a row, so that every token past the first row keeps
half a row of its document before it, as the bits per byte do.

--tasks FILE.jsonl: your records, {"prompt": ..., "answer": ...} or {"messages": [...], "answer": ...},
answered greedily in batches and scored by --match exact (after normalising spaces and a final full
stop) or contains.

Prompts and stop tokens are those of `darkhorse chat`: darkhorse's chat format, or an imported model's
own chat template. --compare CKPT2 evaluates a second model the same way and sets the two side by side.
--json OUT writes every figure and answer; with several tasks (skill families, task files) a bar chart
goes to --chart PNG (default: beside --json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from darkhorse.config import device_arg, number_arg
from darkhorse.errors import DarkhorseError

HELP = "evaluate a checkpoint or HF model: prompt suite, perplexity + bits/byte, your own tasks"
DEFAULT_PER_SKILL = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint dir, or a Hugging Face model dir")
    parser.add_argument("--compare", type=Path, metavar="CKPT2", help="a second model, evaluated the same way")
    parts = parser.add_argument_group("parts (default: --suite)")
    parts.add_argument("--suite", action="store_true", help="the eight prompts plus the demo's skill families")
    parts.add_argument(
        "--suite-per-skill",
        type=number_arg(int, ge=0),
        default=DEFAULT_PER_SKILL,
        metavar="N",
        help=f"held-out demo problems per skill in --suite (default {DEFAULT_PER_SKILL}; 0: the prompts only)",
    )
    parts.add_argument("--text", type=Path, metavar="FILE|PREPARED_DIR", help="perplexity and bits per byte")
    parts.add_argument("--split", default="val", choices=("train", "val"), help="split of a prepared dir (default val)")
    parts.add_argument("--all-tokens", action="store_true", help="--text: score every token, not only the loss mask")
    parts.add_argument(
        "--window", type=number_arg(int, gt=0), help="--text: tokens per scoring window (default: the model's context)"
    )
    parts.add_argument("--tasks", type=Path, nargs="+", metavar="FILE.jsonl", help="your own prompt/answer records")
    parts.add_argument(
        "--match", choices=("exact", "contains"), default="exact", help="--tasks scoring (default exact)"
    )
    parser.add_argument("--think", action="store_true", help="--tasks: let the model reason before answering")
    parser.add_argument("--no-think", action="store_true", help="--suite prompts: answer without reasoning")
    parser.add_argument(
        "--max-new-tokens", type=number_arg(int, gt=0), default=128, help="tokens per answer at most (default 128)"
    )
    parser.add_argument(
        "--batch-size", type=number_arg(int, gt=0), default=64, help="prompts decoded together (default 64)"
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write all results as JSON")
    parser.add_argument("--chart", type=Path, metavar="PNG", help="bar chart of accuracy per task (default OUT.png)")
    parser.add_argument("--force", action="store_true", help="replace existing --json/--chart files")
    parser.add_argument("--device", type=device_arg, default="auto", help="auto, cpu, cuda, mps (default auto)")


def _check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens <= 0 or args.batch_size <= 0:
        raise DarkhorseError("--max-new-tokens and --batch-size must be > 0")
    if args.suite_per_skill < 0:
        raise DarkhorseError("--suite-per-skill must be >= 0")
    if args.window is not None and args.window <= 0:
        raise DarkhorseError("--window must be > 0")
    for path in (args.json, _chart_path(args)):
        if path is not None and path.exists() and not args.force:
            raise DarkhorseError(f"{path} already exists; pass --force to replace it")


def _chart_path(args: argparse.Namespace) -> Path | None:
    return args.chart or (args.json.with_suffix(".png") if args.json else None)


def evaluate_one(args: argparse.Namespace, path: Path, tasks: dict[str, list[dict]], console) -> Any:
    """Every selected part on one model."""
    from darkhorse.eval.exact_match import evaluate_exact_match
    from darkhorse.eval.perplexity import score_text
    from darkhorse.eval.report import ModelEval
    from darkhorse.eval.suite import run_suite, skill_records
    from darkhorse.interop.hf_import import load_checkpoint_or_hf
    from darkhorse.train.device import resolve_device

    with console.status(f"loading {path}"):
        model, tokenizer, _ = load_checkpoint_or_hf(path, resolve_device(args.device))
    result = ModelEval(label=str(path))
    options = {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size}
    if args.suite:
        with console.status(f"{path}: the prompt suite"):
            result.suite = run_suite(model, tokenizer, think=not args.no_think, max_new_tokens=args.max_new_tokens)
        if args.suite_per_skill:
            records = skill_records(args.suite_per_skill)
            with console.status(f"{path}: {len(records)} held-out demo problems"):
                result.skills = evaluate_exact_match(model, tokenizer, records, **options)
    if args.text is not None:
        with console.status(f"{path}: scoring {args.text}"):
            result.text = score_text(
                model, tokenizer, args.text, split=args.split, all_tokens=args.all_tokens, window=args.window
            )
        with console.status(f"{path}: routing on {args.text}, tags withheld"):
            result.routing = _held_out_routing(model, tokenizer, args.text, args.split)
    for name, records in tasks.items():
        with console.status(f"{path}: {len(records)} tasks of {name}"):
            result.tasks[name] = evaluate_exact_match(
                model, tokenizer, records, think=args.think, match=args.match, **options
            )
    return result


def _held_out_routing(model, tokenizer, path: Path, split: str) -> dict[str, Any] | None:
    """A MoE model's routing on a tagged prepared dir's split with the tags withheld (None otherwise)."""
    import torch

    from darkhorse.data.prepared import looks_prepared, open_prepared
    from darkhorse.train.routing import held_out_isolation, moe_layers

    if not (moe_layers(model) and looks_prepared(path)):
        return None
    data = open_prepared(path)
    domains = data.domains(split)
    if domains is None or not data.domain_names:
        return None
    tokens = torch.from_numpy(data.tokens(split).astype("int64"))
    seq_len = min(model.config.max_seq_len, 512)
    tagged = torch.from_numpy(domains.astype("int64"))
    with torch.inference_mode():
        return held_out_isolation(
            model, tokens, tagged, seq_len, tokenizer.bos_id, data.domain_names, stride=max(1, seq_len // 2)
        )


def _suite_table(result) -> Any:
    from rich.table import Table

    table = Table(title=f"prompt suite: {result.label}", show_lines=True)
    columns = {"prompt": "left", "thinking used": "center", "thinking": "left", "answer": "left",
               "tokens": "right", "seconds": "right", "check": "center"}  # fmt: skip
    for column, justify in columns.items():
        table.add_column(column, justify=justify, overflow="fold")
    for row in result.suite:
        check = "-" if row.correct is None else "[green]right[/]" if row.correct else f"[red]wrong[/] ({row.expected})"
        table.add_row(row.prompt, "yes" if row.thinking_used else "no", row.thinking or "", row.answer,
                      str(row.tokens), f"{row.seconds:.2f}", check)  # fmt: skip
    return table


def _summary_table(results: list[Any]) -> Any:
    from rich.table import Table

    table = Table(title="evaluation" if len(results) == 1 else "evaluation, side by side")
    table.add_column("")
    for result in results:
        table.add_column(result.label, justify="right", overflow="fold")
    metrics = [result.metrics() for result in results]
    for name in dict.fromkeys(name for m in metrics for name in m):
        table.add_row(name, *(m.get(name, "-") for m in metrics))
    return table


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from darkhorse.eval.tasks import read_tasks
    from darkhorse.files import atomic_file

    _check_args(args)
    if not (args.suite or args.text or args.tasks):
        args.suite = True
    tasks = {}
    for path in args.tasks or []:  # read (and check) every task file before any model time is spent
        name = path.stem if path.stem not in tasks else str(path)
        tasks[name] = read_tasks(path)
    console = Console()
    results = [evaluate_one(args, path, tasks, console) for path in (args.checkpoint, args.compare) if path]
    for result in results:
        if result.suite is not None:
            console.print(_suite_table(result))
    console.print(_summary_table(results))
    if args.json:
        with atomic_file(args.json, force=args.force) as staged:
            staged.write_text(json.dumps({"models": [r.to_dict() for r in results]}, indent=2) + "\n")
        console.print(f"wrote {args.json}", highlight=False)
    series = {result.label: result.accuracies() for result in results}
    chart = _chart_path(args)
    if max(len(bars) for bars in series.values()) > 1 and chart is not None:
        from darkhorse.train.reports import write_accuracy_chart

        with atomic_file(chart, force=args.force) as staged:
            write_accuracy_chart(staged, series)
        console.print(f"wrote {chart}", highlight=False)
    return 0
