"""The quick after-training check: eight fixed prompts answered one at a time, plus the demo's skills.

The eight prompts are the evaluation script of the dense Forge-1 workflow that darkhorse replaces
(arithmetic, a word problem, a haiku, a capital, sorting, and three more of the same kinds). For each
the report shows what that script showed: whether the model reasoned, its reasoning, its answer, the
tokens it wrote and the seconds it took; a prompt with a checkable answer is scored by whether the
reply contains it. The skill families are held-out problems of `darkhorse demo`'s corpus, scored by
exact match (meaningful for a model trained on that corpus or on similar chat data).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from darkhorse.data.demo_corpus import build_demo_corpus
from darkhorse.data.tokenizer import Tokenizer
from darkhorse.eval.exact_match import is_match
from darkhorse.infer.engine import Engine
from darkhorse.infer.prompting import chat_stop_ids, encode_chat_prompt, split_reply
from darkhorse.infer.sampling import SamplingOptions


@dataclass(frozen=True)
class SuitePrompt:
    prompt: str
    expected: str | None = None  # the reply must contain it; None: not checkable (e.g. a haiku)


SUITE_PROMPTS = (
    SuitePrompt("What is 15 * 23?", "345"),
    SuitePrompt("If a train travels at 60mph for 2.5 hours, how far does it travel?", "150"),
    SuitePrompt("Write a haiku about programming."),
    SuitePrompt("What is the capital of France?", "Paris"),
    SuitePrompt("Sort these numbers: 5, 2, 8, 1, 9", "1, 2, 5, 8, 9"),
    SuitePrompt("What is 144 / 12?", "12"),
    SuitePrompt("Explain in one sentence why the sky is blue."),
    SuitePrompt("Which is larger, 0.7 or 0.65?", "0.7"),
)


@dataclass
class SuiteRow:
    prompt: str
    thinking_used: bool
    thinking: str | None
    answer: str
    tokens: int
    seconds: float
    expected: str | None
    correct: bool | None  # None when the prompt has no checkable answer


def run_suite(
    model,
    tokenizer: Tokenizer,
    prompts: tuple[SuitePrompt, ...] = SUITE_PROMPTS,
    *,
    think: bool = True,
    max_new_tokens: int = 256,
) -> list[SuiteRow]:
    """Answer each prompt greedily, alone (so its seconds are its own), in the model's chat format."""
    engine = Engine(model, tokenizer.vocab_size)
    stop_ids = chat_stop_ids(tokenizer)
    options = SamplingOptions(max_new_tokens=max_new_tokens, stop_ids=stop_ids)  # greedy
    rows = []
    for item in prompts:
        _, ids = encode_chat_prompt(tokenizer, [{"role": "user", "content": item.prompt}], think=think)
        started = time.perf_counter()
        (continuation,) = engine.generate([ids], options)
        seconds = time.perf_counter() - started
        text = tokenizer.decode(continuation[:-1] if continuation and continuation[-1] in stop_ids else continuation)
        reasoning, answer = split_reply(tokenizer, text, opened_think=think)
        correct = None if item.expected is None else is_match(answer, item.expected, "contains")
        rows.append(SuiteRow(item.prompt, bool(reasoning), reasoning, answer, len(continuation), seconds,
                             item.expected, correct))  # fmt: skip
    return rows


def suite_score(rows: list[SuiteRow]) -> tuple[int, int]:
    """(correct, checkable) over the rows with a checkable answer."""
    checked = [row.correct for row in rows if row.correct is not None]
    return sum(checked), len(checked)


def suite_to_dict(rows: list[SuiteRow]) -> dict[str, Any]:
    correct, total = suite_score(rows)
    return {"correct": correct, "checked": total, "rows": [asdict(row) for row in rows]}


def skill_records(per_skill: int, seed: int = 0) -> list[dict[str, Any]]:
    """`per_skill` held-out problems of each demo skill (seed 0, 100 per skill: the demo's own held-out set)."""
    return [
        example.to_record() for example in build_demo_corpus(seed, train_size=0, heldout_per_skill=per_skill).heldout
    ]
