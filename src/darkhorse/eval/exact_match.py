"""Exact-match (or contains) accuracy on chat records with a known final answer, per skill and per domain.

Works on any records shaped like the chat JSONL that `prepare` reads, tagged with `domain` and
`skill` (the demo's held-out split is one such set): everything before the last assistant turn is
the prompt, that turn's content is the expected answer. The model answers greedily in its own chat
format, prompted as `chat` prompts it (so an imported model answers in its own template), and only
its final answer (not its reasoning) is compared, after normalising whitespace and a trailing full
stop, so formatting noise does not count as a wrong answer. `match="contains"` accepts a reply that
holds the expected answer anywhere (case-insensitive), for free-form answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from darkhorse.errors import DarkhorseError
from darkhorse.infer.engine import Engine
from darkhorse.infer.prompting import chat_stop_ids, encode_chat_prompt, split_reply
from darkhorse.infer.sampling import SamplingOptions

UNTAGGED = "-"
MATCHES = ("exact", "contains")


def normalize_answer(text: str) -> str:
    """One space between words, no surrounding space, no trailing full stop."""
    return re.sub(r"\s+", " ", text).strip().removesuffix(".").rstrip()


def is_exact_match(predicted: str, expected: str) -> bool:
    return normalize_answer(predicted) == normalize_answer(expected)


def is_match(predicted: str, expected: str, match: str = "exact") -> bool:
    """`exact`: equal after `normalize_answer`; `contains`: the expected answer appears in the reply."""
    if match == "contains":
        return normalize_answer(expected).casefold() in normalize_answer(predicted).casefold()
    return is_exact_match(predicted, expected)


@dataclass
class Outcome:
    domain: str
    skill: str
    question: str
    expected: str
    predicted: str
    reasoning: str | None = None
    match: str = "exact"
    tokens: int = 0  # generated, stop token included

    @property
    def correct(self) -> bool:
        return is_match(self.predicted, self.expected, self.match)


@dataclass
class Tally:
    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


@dataclass
class ExactMatchReport:
    outcomes: list[Outcome]

    def _tally(self, group: Callable[[Outcome], str]) -> dict[str, Tally]:
        tallies: dict[str, Tally] = {}
        for outcome in self.outcomes:
            tally = tallies.setdefault(group(outcome), Tally())
            tally.total += 1
            tally.correct += outcome.correct
        return dict(sorted(tallies.items()))

    def by_skill(self) -> dict[str, Tally]:
        return self._tally(lambda o: o.skill)

    def by_domain(self) -> dict[str, Tally]:
        return self._tally(lambda o: o.domain)

    def overall(self) -> Tally:
        return self._tally(lambda o: "all").get("all", Tally())

    def to_dict(self) -> dict[str, Any]:
        def table(tallies: Mapping[str, Tally]) -> dict[str, dict[str, float]]:
            return {k: {"correct": t.correct, "total": t.total, "accuracy": t.accuracy} for k, t in tallies.items()}

        overall = self.overall()
        return {
            "overall": {"correct": overall.correct, "total": overall.total, "accuracy": overall.accuracy},
            "by_skill": table(self.by_skill()),
            "by_domain": table(self.by_domain()),
            "outcomes": [asdict(o) | {"correct": o.correct} for o in self.outcomes],
        }


def split_record(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, expected answer): the answer is the content of the last assistant turn."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], Mapping):
        raise DarkhorseError("eval record has no 'messages' list")
    last = messages[-1]
    if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
        raise DarkhorseError("eval record must end with an assistant message holding the expected answer")
    return [dict(m) for m in messages[:-1]], last["content"]


def record_question(prompt_messages: Sequence[Mapping[str, str]]) -> str:
    """The last user turn, which is what a report shows as the question."""
    users = [m["content"] for m in prompt_messages if m.get("role") == "user"]
    return users[-1] if users else ""


def evaluate_exact_match(
    model,
    tokenizer,
    records: Iterable[Mapping[str, Any]],
    *,
    think: bool | None = None,
    max_new_tokens: int = 96,
    batch_size: int = 64,
    match: str = "exact",
    on_outcome: Callable[[Outcome], None] | None = None,
) -> ExactMatchReport:
    """Answer every record greedily in the model's chat format and score the final answers.

    The prompt and its stop ids come from infer/prompting.py as for chat: darkhorse's chat format, or
    an imported model's own chat template. `think=None` follows each record: reason first when its
    reference has reasoning. Records of similar prompt length decode together, `batch_size` at a
    time. Outcomes keep the order of `records`; `on_outcome` sees each as its batch finishes (for
    progress bars). `match` is "exact" or "contains" (see `is_match`).
    """
    if match not in MATCHES:
        raise DarkhorseError(f"match must be one of {', '.join(MATCHES)}, got {match!r}")
    engine = Engine(model, tokenizer.vocab_size)
    stop_ids = chat_stop_ids(tokenizer)
    options = SamplingOptions(max_new_tokens=max_new_tokens, stop_ids=stop_ids)  # greedy
    items = []
    for record in records:
        prompt_messages, expected = split_record(record)
        use_think = bool(record.get("reasoning")) if think is None else think
        _, ids = encode_chat_prompt(tokenizer, prompt_messages, think=use_think)
        items.append((record, prompt_messages, expected, use_think, ids))
    # Sorted by length, a batch spends few steps feeding its longer prompts' tails token by token.
    order = sorted(range(len(items)), key=lambda i: len(items[i][4]))
    outcomes: list[Outcome | None] = [None] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        continuations = engine.generate([items[i][4] for i in chunk], options)
        for index, continuation in zip(chunk, continuations, strict=True):
            record, prompt_messages, expected, use_think, _ = items[index]
            generated = len(continuation)
            if continuation and continuation[-1] in stop_ids:
                continuation = continuation[:-1]
            reasoning, answer = split_reply(tokenizer, tokenizer.decode(continuation), opened_think=use_think)
            outcome = Outcome(
                domain=str(record.get("domain") or UNTAGGED),
                skill=str(record.get("skill") or UNTAGGED),
                question=record_question(prompt_messages),
                expected=expected,
                predicted=answer,
                reasoning=reasoning,
                match=match,
                tokens=generated,
            )
            outcomes[index] = outcome
            if on_outcome is not None:
                on_outcome(outcome)
    return ExactMatchReport([o for o in outcomes if o is not None])
