"""The built-in corpus of `darkhorse demo`: short chat records of skills whose answers can be checked.

Each record is `{"domain", "skill", "messages": [user, assistant], "reasoning"}`: the user asks, the
reasoning (rendered in the think block) shows the worked steps, and the assistant replies with the
final answer only, so exact match on the reply is a fair score. Domains (math, lists, code) are what
a mixture-of-experts router can learn to specialise on.

The held-out split is drawn first and every training record whose problem matches one of its
problems (same numbers in any order, same code) is rejected, so held-out accuracy measures
generalisation, not recall. Generation is a pure function of the seed.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Example:
    """One checkable problem; `key` identifies the problem up to trivial rewording or reordering."""

    domain: str
    skill: str
    question: str
    reasoning: str | None
    answer: str
    key: str

    def to_record(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "skill": self.skill,
            "messages": [
                {"role": "user", "content": self.question},
                {"role": "assistant", "content": self.answer},
            ],
            "reasoning": self.reasoning,
        }


@dataclass(frozen=True)
class Skill:
    name: str
    domain: str
    make: Callable[[random.Random], Example]
    weight: float  # share of the training records, relative to the other skills
    make_training: Callable[[random.Random], Example] | None = None  # training draws, where not `make`'s


# ---------------------------------------------------------------------------------------------
# math


def _column_addition_steps(a: int, b: int) -> list[str]:
    """Right-to-left digit sums with carries, the way it is done on paper."""
    steps = []
    carry = 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        terms = f"{x}+{y}" + (f"+{carry}" if carry else "")
        steps.append(f"{terms}={total}")
        carry = total // 10
    return steps


def _column_subtraction_steps(a: int, b: int) -> list[str]:
    """Right-to-left digit differences with borrows (a >= b)."""
    steps = []
    borrow = 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(len(da)):
        x = int(da[i]) - borrow
        y = int(db[i]) if i < len(db) else 0
        borrow = int(x < y)
        top = x + 10 * borrow
        steps.append(f"{top}-{y}={top - y}" + (" borrow 1" if borrow else ""))
    return steps


def addition_problem(a: int, b: int) -> Example:
    steps = _column_addition_steps(a, b)
    return Example(
        domain="math",
        skill="addition",
        question=f"What is {a} + {b}?",
        reasoning=", ".join(steps) + f", so {a + b}",
        answer=str(a + b),
        key=f"add:{min(a, b)},{max(a, b)}",
    )


def make_addition(rng: random.Random) -> Example:
    return addition_problem(rng.randint(10, 99), rng.randint(10, 99))


def make_multi_digit(rng: random.Random) -> Example:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    if rng.random() < 0.5:
        steps, op, result, key = _column_addition_steps(a, b), "+", a + b, f"add:{min(a, b)},{max(a, b)}"
    else:
        a, b = max(a, b), min(a, b)
        steps, op, result, key = _column_subtraction_steps(a, b), "-", a - b, f"sub:{a},{b}"
    return Example(
        domain="math",
        skill="multi_digit",
        question=f"What is {a} {op} {b}?",
        reasoning=", ".join(steps) + f", so {result}",
        answer=str(result),
        key=key,
    )


NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo")
ITEMS = ("apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles")


def make_word_problem(rng: random.Random) -> Example:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        expression, result = f"{a} + {b}", a + b
    elif kind == 1:
        a = rng.randint(10, 80)
        b = rng.randint(1, a - 1)
        question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        expression, result = f"{a} - {b}", a - b
    elif kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        question = f"There are {a} bags with {b} {item} in each bag. How many {item} are there?"
        expression, result = f"{a} * {b}", a * b
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        question = f"{name} shares {a * b} {item} equally among {b} friends. How many does each friend get?"
        expression, result = f"{a * b} / {b}", a
    # + and - draw from 2,000+ facts, so a held-out one is a sum the model must work out. * and / draw from
    # the 64 facts of a times table, which is recalled, not worked out: holding the fact out would ask for a
    # fact no training record states, so a held-out one is a new story about a fact training states.
    key = f"wp:{expression}" if kind < 2 else f"wp:{question}"
    return Example(
        domain="math",
        skill="word_problem",
        question=question,
        reasoning=f"{expression} = {result}",
        answer=str(result),
        key=key,
    )


def _sum_in_columns(a: int, b: int) -> str:
    """`a + b` worked as the addition skill adds, so word problems and snippets share its most-trained lookup."""
    return f"{a} + {b}: " + ", ".join(_column_addition_steps(a, b)) + f", so {a + b}"


def _difference_in_columns(a: int, b: int) -> str:
    """`a - b` in the multi-digit skill's borrow columns; below zero as `-(b - a)`."""
    stated = f"{a} - {b}" if a >= b else f"-({b} - {a})"
    return f"{stated}: " + ", ".join(_column_subtraction_steps(max(a, b), min(a, b))) + f", so {a - b}"


def in_columns(example: Example) -> Example:
    """A word problem's + or - worked in columns, as the addition skill adds; * and / as they are.

    Only the second mix has them: in the first they delayed the copying jump (docs/experiments.md)."""
    a, op, b = example.reasoning.split(" = ")[0].split()
    if op not in "+-":
        return example
    worked = _sum_in_columns if op == "+" else _difference_in_columns
    return dataclasses.replace(example, reasoning=worked(int(a), int(b)))


def make_compare(rng: random.Random) -> Example:
    digits = rng.choice((2, 3))
    low, high = 10 ** (digits - 1), 10**digits - 1
    a, b = rng.sample(range(low, high + 1), 2)
    larger = rng.random() < 0.5
    answer = max(a, b) if larger else min(a, b)
    relation = f"{min(a, b)} < {max(a, b)}"
    return Example(
        domain="math",
        skill="compare",
        question=f"Which is {'larger' if larger else 'smaller'}: {a} or {b}?",
        reasoning=relation,
        answer=str(answer),
        key=f"cmp:{'max' if larger else 'min'}:{min(a, b)},{max(a, b)}",
    )


# ---------------------------------------------------------------------------------------------
# lists


def sort_problem(numbers: list[int]) -> Example:
    ordered = sorted(numbers)
    return Example(
        domain="lists",
        skill="sort",
        question="Sort in ascending order: " + ", ".join(map(str, numbers)),
        reasoning=None,
        answer=", ".join(map(str, ordered)),
        key="sort:" + ",".join(map(str, ordered)),
    )


def make_sort(rng: random.Random) -> Example:
    return sort_problem([rng.randint(10, 99) for _ in range(5)])


def make_sort_training(rng: random.Random) -> Example:
    """Half the training lists drawn from 20 consecutive numbers: close numbers are where sort fails."""
    if rng.random() < 0.5:
        low = rng.randint(10, 80)
        return sort_problem([rng.randint(low, low + 19) for _ in range(5)])
    return make_sort(rng)


# ---------------------------------------------------------------------------------------------
# code: each snippet's output is worked out here by hand-written logic; the tests run the snippet.

SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")


def _word(rng: random.Random) -> str:
    """A made-up pronounceable word, so string snippets come in thousands of variants."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))


def _from_the_end(items: list[str], count: int) -> str:
    """The last `count` items, each under its negative index (`-1:e -2:g`): reversal and xs[-i] share it."""
    return " ".join(f"{-k}:{items[-k]}" for k in range(1, count + 1))


def _snippet(rng: random.Random) -> tuple[str, str, str]:
    """(code, printed output, trace) for one of several small programs.

    Traces work the answer in steps other skills train (columns, sorting) or in a listing the answer is
    copied from, not as a fact recalled in one token (docs/experiments.md, eighth session)."""
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        op = rng.choice("+-*")
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        worked = {"+": _sum_in_columns, "-": _difference_in_columns}.get(op)
        trace = f"a {op} b = " + (worked(a, b) if worked else f"{a} {op} {b} = {result}")
        return f"a = {a}\nb = {b}\nprint(a {op} b)", str(result), trace
    if kind == 1:
        word = _word(rng)
        return f'print(len("{word}"))', str(len(word)), f'"{word}" has {len(word)} characters'
    if kind == 2:
        word = _word(rng)
        return f'print("{word}"[::-1])', word[::-1], f"{_from_the_end(list(word), len(word))}, so {word[::-1]}"
    if kind == 3:
        xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
        i = rng.randrange(-len(xs), len(xs))
        items = list(map(str, xs))
        listing = _from_the_end(items, -i) if i < 0 else " ".join(f"{k}:{items[k]}" for k in range(i + 1))
        return f"xs = {xs}\nprint(xs[{i}])", str(xs[i]), f"xs[{i}]: {listing}, so {xs[i]}"
    if kind == 4:
        start, n = rng.randint(0, 20), rng.randint(2, 5)
        added = n * (n - 1) // 2
        code = f"total = {start}\nfor i in range({n}):\n    total += i\nprint(total)"
        terms = " + ".join(map(str, [start, *range(n)]))  # the start first, copied while it is near
        return code, str(start + added), f"{terms} = {_sum_in_columns(start, added)}"
    if kind == 5:
        x, limit = rng.randint(0, 9), rng.randint(1, 8)
        word = "big" if x > limit else "small"
        code = f'x = {x}\nif x > {limit}:\n    print("big")\nelse:\n    print("small")'
        return code, word, f"{x} > {limit} is {x > limit}"
    if kind == 6:
        a, b = rng.randint(10, 40), rng.randint(2, 9)
        q, r = divmod(a, b)
        return f"print({a} // {b}, {a} % {b})", f"{q} {r}", f"{a} = {b} * {q} + {r}"
    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    fn = rng.choice(("max", "min", "sum"))
    result = {"max": max, "min": min, "sum": sum}[fn](xs)
    if fn == "sum":  # running sums
        steps, total = [], xs[0]
        for x in xs[1:]:
            steps.append(f"{total}+{x}={total + x}")
            total += x
        worked = ", ".join(steps)
    else:  # sorted as the sort skill sorts, then its first or last
        worked = "sorted " + ", ".join(map(str, sorted(xs)))
    return f"print({fn}({xs}))", str(result), f"{fn}: {worked}, so {result}"


def make_python(rng: random.Random) -> Example:
    code, output, trace = _snippet(rng)
    return Example(
        domain="code",
        skill="python",
        question=f"What does this Python code print?\n{code}",
        reasoning=trace,
        answer=output,
        key=code,
    )


SKILLS: dict[str, Skill] = {
    skill.name: skill
    for skill in (
        Skill("addition", "math", make_addition, 4.0),
        Skill("multi_digit", "math", make_multi_digit, 1.0),
        Skill("word_problem", "math", make_word_problem, 1.0),
        Skill("compare", "math", make_compare, 1.0),
        Skill("sort", "lists", make_sort, 4.0, make_sort_training),
        # At 1 (8.9% of the tokens) 1,500 steps never taught the model to read a snippet: python ~20% in every
        # run. At 3 with the worked traces 48 / 50 / 26% in seeds 0-2 (docs/experiments.md, eighth session).
        Skill("python", "code", make_python, 3.0),
    )
}


# `darkhorse demo train.source_steps=N` reads a second mix from step N on: by then the model copies numbers
# (sort and compare), so addition, learned first, gives up a quarter of its share to the arithmetic that
# needs more steps, whose word problems are worked in columns there (`in_columns`). Over 3 seeds at 750 of
# 1,500 steps: all skills 52.2 -> 59.7% (mean), sort 76.3 -> 70.3% (docs/experiments.md, sixth session).
SECOND_WEIGHTS = {"addition": 3.0, "multi_digit": 2.0, "word_problem": 2.0, "compare": 1.0, "sort": 4.0, "python": 1.0}


@dataclass
class DemoCorpus:
    train: list[Example]
    heldout: list[Example]
    second: list[Example]  # the second phase's records (SECOND_WEIGHTS), empty unless asked for


def _unique(skill: Skill, rng: random.Random, count: int, taken: set[str]) -> list[Example]:
    """`count` examples whose keys are not in `taken` (which grows); gives up if the space runs dry."""
    examples: list[Example] = []
    misses = 0
    while len(examples) < count:
        example = skill.make(rng)
        if example.key in taken:
            misses += 1
            if misses > 100 * count + 1000:
                raise ValueError(f"skill {skill.name} cannot produce {count} distinct problems")
            continue
        taken.add(example.key)
        examples.append(example)
    return examples


def _training_mix(
    rng: random.Random, size: int, weights: dict[str, float], reserved: dict[str, set[str]]
) -> list[Example]:
    """`size` records shared out by `weights`, shuffled, none of them a reserved (held-out) problem."""
    total_weight = sum(weights.values())
    records: list[Example] = []
    for name, weight in weights.items():
        wanted = round(size * weight / total_weight)
        make = SKILLS[name].make_training or SKILLS[name].make
        while wanted:
            example = make(rng)
            if example.key not in reserved[name]:
                records.append(example)
                wanted -= 1
    rng.shuffle(records)
    return records


def build_demo_corpus(
    seed: int = 0, train_size: int = 40_000, heldout_per_skill: int = 100, second_size: int = 0
) -> DemoCorpus:
    """Held-out problems first (distinct), then training records that never repeat a held-out problem,
    then `second_size` records of the second phase's mix.

    Training problems may repeat among themselves (as in any real corpus); the held-out ones are
    unique so that each counts once. The second phase is drawn last, so the held-out and the first
    phase's records are those of a corpus without it.
    """
    rng = random.Random(seed)
    heldout: list[Example] = []
    reserved: dict[str, set[str]] = {}
    for skill in SKILLS.values():
        reserved[skill.name] = set()
        heldout.extend(_unique(skill, rng, heldout_per_skill, reserved[skill.name]))
    train = _training_mix(rng, train_size, {name: skill.weight for name, skill in SKILLS.items()}, reserved)
    second = _training_mix(rng, second_size, SECOND_WEIGHTS, reserved) if second_size else []
    second = [in_columns(e) if e.skill == "word_problem" else e for e in second]
    return DemoCorpus(train=train, heldout=heldout, second=second)


def write_jsonl(examples: Iterable[Example], path: str | Path) -> int:
    """Write records in the chat form `darkhorse prepare` reads; returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example.to_record(), ensure_ascii=False) + "\n")
            count += 1
    return count
