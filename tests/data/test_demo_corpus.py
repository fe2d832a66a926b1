"""The demo corpus is deterministic, keeps held-out problems out of training, and states true answers."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from darkhorse.data.demo_corpus import (
    SKILLS,
    _columns_built,
    addition_problem,
    build_demo_corpus,
    sort_problem,
    write_jsonl,
)


@pytest.fixture(scope="module")
def corpus():
    return build_demo_corpus(seed=3, train_size=6000, heldout_per_skill=60)


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def test_same_seed_same_corpus_and_other_seed_differs(corpus):
    again = build_demo_corpus(seed=3, train_size=6000, heldout_per_skill=60)
    other = build_demo_corpus(seed=4, train_size=6000, heldout_per_skill=60)
    assert again.train == corpus.train and again.heldout == corpus.heldout
    assert other.heldout != corpus.heldout


def test_every_skill_is_present_in_both_splits_in_proportion(corpus):
    heldout_counts = {name: sum(e.skill == name for e in corpus.heldout) for name in SKILLS}
    assert heldout_counts == dict.fromkeys(SKILLS, 60)
    total_weight = sum(s.weight for s in SKILLS.values())
    for name, skill in SKILLS.items():
        count = sum(e.skill == name for e in corpus.train)
        assert count == round(6000 * skill.weight / total_weight)
        assert all(e.domain == skill.domain for e in corpus.train if e.skill == name)


def test_no_heldout_problem_or_question_appears_in_training(corpus):
    train_keys = {(e.skill, e.key) for e in corpus.train}
    train_questions = {e.question for e in corpus.train}
    assert not {(e.skill, e.key) for e in corpus.heldout} & train_keys
    assert not {e.question for e in corpus.heldout} & train_questions
    assert len({(e.skill, e.key) for e in corpus.heldout}) == len(corpus.heldout)


def test_problem_keys_ignore_operand_and_list_order():
    """'What is 38 + 47?' in training would leak the held-out 'What is 47 + 38?'."""
    assert addition_problem(47, 38).key == addition_problem(38, 47).key
    assert addition_problem(47, 38).question != addition_problem(38, 47).question
    assert addition_problem(47, 38).key != addition_problem(47, 39).key
    assert sort_problem([5, 1, 9, 1, 3]).key == sort_problem([1, 1, 3, 9, 5]).key


def _claims_hold(trace: str) -> None:
    """Every worked step in a trace is true arithmetic: `7-9+10=8`, `3 * 9 = 27`, `max 4 7=7`."""
    for expression, value in re.findall(r"(\d+(?:\s?[-+*]\s?\d+)+)\s?=\s?(\d+)", trace):
        assert eval(expression) == int(value), trace  # digits and + - * only, from the generator
    for fn, a, b, value in re.findall(r"(max|min) (\d+) (\d+)=(\d+)", trace):
        assert {"max": max, "min": min}[fn](int(a), int(b)) == int(value), trace


def _check_columns(a: int, b: int, op: str, trace: str) -> None:
    """Each column's partial result is the last digits of the sum being built (for a - b, the sum
    a + (99..9 - b) + 1), the last one all of it; a subtraction then drops its leading 1."""
    width = max(len(str(a)), len(str(b)))
    total = str(a + b if op == "+" else a + (10**width - 1 - b) + 1)
    steps = trace.split(", ")
    if op == "-":
        assert total[0] == "1" and steps.pop() == f"so {a - b}", (a, b, trace)
    assert len(steps) == width
    for count, step in enumerate(steps, 1):
        assert step.split(" -> ")[1] == (total if count == width else total[-count:]), (a, op, b, trace)
    _claims_hold(trace)


def test_arithmetic_answers_and_steps_are_correct(corpus):
    for example in corpus.train[:3000] + corpus.heldout:
        if example.skill not in ("addition", "multi_digit"):
            continue
        match = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", example.question)
        assert match, example.question
        a, op, b = int(match[1]), match[2], int(match[3])
        assert int(example.answer) == (a + b if op == "+" else a - b)
        if example.skill == "addition":
            assert all(10 <= n <= 99 for n in _numbers(example.question))
            assert example.reasoning.endswith(f"so {example.answer}")
            _claims_hold(example.reasoning.removesuffix(f", so {example.answer}").replace(" borrow 1", ""))
        else:
            _check_columns(a, b, op, example.reasoning)


@pytest.mark.parametrize(
    ("a", "b", "op", "trace"),
    [
        (958, 683, "+", "8+3=11 -> 1, 5+8+1=14 -> 41, 9+6+1=16 -> 1641"),
        (907, 159, "-", "7+0+1=8 -> 8, 0+4=4 -> 48, 9+8=17 -> 1748, so 748"),
        (905, 900, "-", "5+9+1=15 -> 5, 0+9+1=10 -> 05, 9+0+1=10 -> 1005, so 5"),
        (56, 5, "-", "6+4+1=11 -> 1, 5+9+1=15 -> 151, so 51"),
        (38, 7, "+", "8+7=15 -> 5, 3+0+1=4 -> 45"),
    ],
)
def test_columns_build_the_answer_right_to_left(a, b, op, trace):
    """Carries are written where the next column reads them; no reversal at the end."""
    assert _columns_built(a, b, op) == trace
    _check_columns(a, b, op, trace)


def test_word_problem_answers_and_steps_are_correct(corpus):
    for example in corpus.heldout + corpus.train[:2000]:
        if example.skill != "word_problem":
            continue
        expression, work = example.reasoning.split(": ")
        a, op, b = expression.split()
        assert [int(a), int(b)] == _numbers(example.question)
        exact = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op]
        assert exact == int(example.answer)
        if op in "+-":
            _check_columns(int(a), int(b), op, work)
        else:  # one fact, smaller factor first, whichever way round the problem puts it
            x, y, product = _numbers(work)[:3]
            assert x <= y and product == x * y and {int(a), int(b)} & {x, y, product}
            assert work.endswith(example.answer)
            _claims_hold(work)


def test_compare_and_sort_answers_are_correct(corpus):
    for example in corpus.heldout + corpus.train[:2000]:
        numbers = _numbers(example.question)
        if example.skill == "compare":
            expected = max(numbers) if "larger" in example.question else min(numbers)
            assert example.answer == str(expected)
        elif example.skill == "sort":
            assert len(numbers) == 5
            assert example.answer == ", ".join(map(str, sorted(numbers)))
            assert example.reasoning is None


def test_python_snippets_print_what_the_answer_says_and_the_trace_works_it(corpus):
    kinds = set()
    for example in corpus.heldout + corpus.train[:1500]:
        if example.skill != "python":
            continue
        code = example.question.split("\n", 1)[1]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(code, {})  # our own generated snippets, nothing from outside
        assert printed.getvalue() == example.answer + "\n", code
        trace, answer = example.reasoning, example.answer
        _claims_hold(trace)
        if "[::-1]" in code or "len(" in code:  # letters by position, then (reversal) counted back down
            word = re.search(r'"(\w+)"', code)[1]
            spelled, _, backwards = trace.partition(", ")
            assert spelled == " ".join(f"{i}{c}" for i, c in enumerate(word, 1))
            if backwards:
                assert backwards == " ".join(f"{i}{word[i - 1]}" for i in range(len(word), 0, -1))
                assert "".join(filter(str.isalpha, backwards)) == answer
            else:
                assert spelled.endswith(f"{answer}{word[-1]}")
            kinds.add("letters")
        elif code.startswith("xs ="):  # every element under its index, then the one asked for
            index = re.search(r"xs\[(-?\d+)\]", code)[1]
            assert trace.endswith(f", {index}:{answer}") and f"{index}:{answer}" in trace.split(", ")[0].split()
            kinds.add("index")
        elif "total" in code or re.match(r"print\((sum|max|min)", code):  # a running value, ending at the answer
            assert re.search(rf"=({answer})$", trace), trace
            kinds.add("running")
        elif " - " in trace and answer.startswith("-"):  # the difference the other way round, then the sign
            assert trace.endswith(f"so {answer[1:]}")
            kinds.add("negative")
    assert kinds == {"letters", "index", "running", "negative"}


def test_jsonl_records_are_chat_records_with_domain_and_skill(tmp_path, corpus):
    path = tmp_path / "train.jsonl"
    assert write_jsonl(corpus.heldout[:10], path) == 10
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record, example in zip(records, corpus.heldout[:10], strict=True):
        assert set(record) == {"domain", "skill", "messages", "reasoning"}
        assert record["messages"] == [
            {"role": "user", "content": example.question},
            {"role": "assistant", "content": example.answer},
        ]
        assert record["domain"] in {"math", "lists", "code"}
