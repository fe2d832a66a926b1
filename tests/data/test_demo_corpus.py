"""The demo corpus is deterministic, keeps held-out problems out of training, and states true answers."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from darkhorse.data.demo_corpus import (
    SECOND_WEIGHTS,
    SKILLS,
    Example,
    addition_problem,
    build_demo_corpus,
    sort_problem,
    write_jsonl,
)


@pytest.fixture(scope="module")
def corpus():
    return build_demo_corpus(seed=3, train_size=6000, heldout_per_skill=60, second_size=1200)


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


def test_same_seed_same_corpus_and_other_seed_differs(corpus):
    again = build_demo_corpus(seed=3, train_size=6000, heldout_per_skill=60, second_size=1200)
    other = build_demo_corpus(seed=4, train_size=6000, heldout_per_skill=60)
    assert again == corpus
    assert other.heldout != corpus.heldout


def test_every_skill_is_present_in_both_splits_in_proportion(corpus):
    heldout_counts = {name: sum(e.skill == name for e in corpus.heldout) for name in SKILLS}
    assert heldout_counts == dict.fromkeys(SKILLS, 60)
    total_weight = sum(s.weight for s in SKILLS.values())
    for name, skill in SKILLS.items():
        count = sum(e.skill == name for e in corpus.train)
        assert count == round(6000 * skill.weight / total_weight)
        assert all(e.domain == skill.domain for e in corpus.train if e.skill == name)


def test_the_second_mix_follows_its_weights_and_leaves_the_first_as_it_was(corpus):
    without = build_demo_corpus(seed=3, train_size=6000, heldout_per_skill=60)
    assert without.train == corpus.train and without.heldout == corpus.heldout and without.second == []
    total_weight = sum(SECOND_WEIGHTS.values())
    for name, weight in SECOND_WEIGHTS.items():
        assert sum(e.skill == name for e in corpus.second) == round(1200 * weight / total_weight)
    assert not {(e.skill, e.key) for e in corpus.heldout} & {(e.skill, e.key) for e in corpus.second}
    worked = [e for e in corpus.second if e.skill == "word_problem" and ": " in e.reasoning]
    assert worked and all(" + " in e.reasoning or " - " in e.reasoning for e in worked)  # + and - in columns
    assert not [e for e in corpus.train if e.skill == "word_problem" and ": " in e.reasoning]


def test_no_heldout_problem_or_question_appears_in_training(corpus):
    train_keys = {(e.skill, e.key) for e in corpus.train}
    train_questions = {e.question for e in corpus.train}
    assert not {(e.skill, e.key) for e in corpus.heldout} & train_keys
    assert not {e.question for e in corpus.heldout} & train_questions
    assert len({(e.skill, e.key) for e in corpus.heldout}) == len(corpus.heldout)


def test_heldout_sums_are_new_facts_and_heldout_times_facts_new_stories():
    """A held-out word problem's + or - fact never trains; its * or / fact does, in another story."""
    corpus = build_demo_corpus(seed=0)

    def facts(examples, ops):
        expressions = [e.reasoning.split(" = ")[0] for e in examples if e.skill == "word_problem"]
        return {x for x in expressions if x.split()[1] in ops}

    for ops in ("+-", "*/"):
        heldout = facts(corpus.heldout, ops)
        trained = facts(corpus.train, ops)
        assert heldout and (heldout.isdisjoint(trained) if ops == "+-" else heldout <= trained)


def test_problem_keys_ignore_operand_and_list_order():
    """'What is 38 + 47?' in training would leak the held-out 'What is 47 + 38?'."""
    assert addition_problem(47, 38).key == addition_problem(38, 47).key
    assert addition_problem(47, 38).question != addition_problem(38, 47).question
    assert addition_problem(47, 38).key != addition_problem(47, 39).key
    assert sort_problem([5, 1, 9, 1, 3]).key == sort_problem([1, 1, 3, 9, 5]).key


def _check_arithmetic(example: Example) -> None:
    match = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", example.question)
    assert match, example.question
    a, op, b = int(match[1]), match[2], int(match[3])
    assert int(example.answer) == (a + b if op == "+" else a - b)
    assert example.reasoning.endswith(f"so {example.answer}")
    for step in example.reasoning.split(", ")[:-1]:  # each worked step is itself true arithmetic
        expression, value = step.split(" borrow")[0].split("=")
        assert eval(expression) == int(value), step  # digits and + - only: produced by the generator


def test_arithmetic_answers_and_steps_are_correct(corpus):
    for example in corpus.train[:3000] + corpus.heldout:
        if example.skill in ("addition", "multi_digit"):
            _check_arithmetic(example)
            if example.skill == "addition":
                assert all(10 <= n <= 99 for n in _numbers(example.question))


def test_word_problem_answers_are_correct(corpus):
    for example in corpus.heldout + corpus.train[:2000] + corpus.second:
        if example.skill != "word_problem":
            continue
        expression, value = re.fullmatch(r"(.+?)(?: = |: .*, so )(\d+)", example.reasoning).groups()
        a, op, b = expression.split()
        if ": " in example.reasoning:  # worked in columns (the second mix's + and -): each step true arithmetic
            steps = example.reasoning.split(": ")[1]
            _check_arithmetic(Example("math", "multi_digit", f"What is {expression}?", steps, value, ""))
        assert [int(a), int(b)] == _numbers(example.question)
        exact = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op]
        assert exact == int(value)
        assert example.answer == value


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


def test_half_the_training_sort_lists_are_close_numbers_and_the_heldout_ones_are_not(corpus):
    """Sort fails on close numbers, so training draws half its lists from 20 consecutive numbers; the
    held-out lists stay uniform over 10-99, so the score means what it meant."""

    def close_share(examples):
        spans = [max(n) - min(n) for n in (_numbers(e.question) for e in examples if e.skill == "sort")]
        return sum(span <= 19 for span in spans) / len(spans)

    assert 0.45 < close_share(corpus.train) < 0.6
    assert close_share(corpus.heldout) < 0.1


def test_python_snippets_print_what_the_answer_says(corpus):
    for example in corpus.heldout + corpus.train[:1500]:
        if example.skill != "python":
            continue
        code = example.question.split("\n", 1)[1]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(code, {})  # our own generated snippets, nothing from outside
        assert printed.getvalue() == example.answer + "\n", code


def test_python_traces_work_each_step_truly(corpus):
    """Every sum, difference, listing and sorting a trace writes is true of the snippet."""
    seen = set()
    for example in corpus.heldout + corpus.train[:1500]:
        if example.skill != "python":
            continue
        code, trace = example.question.split("\n", 1)[1], example.reasoning
        for expression, value in re.findall(r"(\d+(?:[+-]\d+)+)=(\d+)", trace):  # column steps, running sums
            assert eval(expression) == int(value), trace  # digits and + - only: produced by the generator
        if match := re.search(r"= (-\()?(\d+) ([+-]) (\d+)\)?: ", trace):  # a + b, a - b, the loop's last sum
            a, op, b = int(match[2]), match[3], int(match[4])
            value = (a + b if op == "+" else a - b) * (-1 if match[1] else 1)
            assert trace.endswith(f"so {value}") and example.answer == str(value), trace
            seen.add(op)
        if listing := re.findall(r"(-?\d+):(\w)", trace):  # xs[i] and reversal: items under their index
            items = re.search(r'"(\w+)"|\[([\d, ]+)\]', code)
            items = list(items[1]) if items[1] else items[2].split(", ")
            assert all(items[int(k)] == v for k, v in listing), trace
            seen.add("listing")
        if "sorted " in trace:
            xs = _numbers(code)
            assert trace.split("sorted ")[1].split(", so")[0] == ", ".join(map(str, sorted(xs)))
            seen.add("sorted")
    assert seen == {"+", "-", "listing", "sorted"}


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
